"""The server's aggregation weights: example counts (FedAvg) or inverse noise variance.

`federation.weighting = "examples"` (the default) weighs client k by p_k ∝ n_k.

`federation.weighting = "inverse_noise"` weighs it by the inverse variance of the DP noise in
its update. Derivation, for a client taking T local DP-SGD steps at rate η with clip C, noise
multiplier σ_k and Poisson rate q_k over n_k examples: each step's privatised gradient is

    g̃ = (Σ_i clip_C(g_i) + N(0, σ_k²C² I)) / (q_k·n_k),

so its noise has per-coordinate standard deviation C·s_k with s_k = σ_k / (q_k·n_k), and with
plain SGD the update Δ_k = −η·Σ_t g̃_t carries noise of variance v_k = T·η²·C²·s_k², the steps'
draws being independent. Every client of a round shares T, η and C, so v_k ∝ s_k². Among the
combinations Σ_k w_k·Δ_k with Σ_k w_k = 1, the noise variance Σ_k w_k²·v_k is smallest
(Lagrange: 2·w_k·v_k = λ for every k) at

    w_k = (1/v_k) / Σ_j (1/v_j)  ∝  1 / s_k² = (q_k·n_k / σ_k)².

With the default batch rule q_k = B/n_k the expected batch q_k·n_k is B for every client and
w_k ∝ 1/σ_k²: the clients with more data, which need less noise for the same ε, count more.
This is the minimum-variance weighting of the noise only: it ignores that clients' true updates
differ (their data do), which FedAvg's n_k weights speak for. Adam rescales each coordinate by
its own noisy second moment, so for Adam the variance model is an approximation. Everything it
reads — σ_k, q_k, n_k — is public (every reply states it), so the weights are post-processing:
no ε.
"""

from __future__ import annotations

import math

from fedlora.errors import FederationError

from fedlora.config import WEIGHTINGS  # noqa: F401  (the allowed values live with the config)


def noise_scale(noise_multiplier: float, sample_rate: float, num_examples: int) -> float:
    """s_k = σ_k / (q_k·n_k): the noise std of a client's privatised mean gradient per unit C."""
    if sample_rate <= 0 or num_examples <= 0:
        return math.inf
    return noise_multiplier / (sample_rate * num_examples)


def aggregation_weight(kind: str, client: int, num_examples: int, scale: float | None) -> float:
    """Client `client`'s unnormalised weight: n_k, or 1/s_k² (see the module docstring)."""
    if kind == "examples":
        return float(num_examples)
    if kind != "inverse_noise":
        raise ValueError(f"unknown weighting {kind!r}")
    if scale is None or not scale > 0 or math.isinf(scale):
        raise FederationError(
            f"federation.weighting='inverse_noise': client {client} reported no DP noise "
            f"(noise scale {scale}) — every site must train under DP for noise weights; use "
            "federation.weighting='examples'")
    return 1.0 / scale**2
