"""Secure aggregation's arithmetic: what a site quantises and what the server gets back.

With `federation.secure_aggregation = true` each round's uploads are summed by Flower's SecAgg+
(`secaggplus_mod` at the sites, `SecAggPlusWorkflow` at the server; secagg_server.py). No
cryptography is ours; what is ours is what goes into the sum and how the result is read.

What is summed. Site k quantises its update Δ_k = u_k − s (its upload minus what it was sent,
`reference`; a base-weight change starts from 0), not u_k: the update is what the bound
`federation.max_update_norm` = U holds, whatever round it is. Flower weights it before masking
by w_k = q_k/T with q_k = round(T·n_k/n_max) (n_max: the largest site of the round), quantises
each coordinate of w_k·Δ_k into T levels over [−R, R] by stochastic rounding, and the server,
unmasking the sum, recovers

    Δ̄ = Σ_k q_k·Δ_k / Σ_k q_k  (+ rounding),   so the aggregate is   s + Δ̄,

the method's weighted mean with weights q_k ∝ n_k. Flower clips a coordinate beyond ±R silently;
here R = U, and a site checks ‖Δ_k‖₂ ≤ U itself (the check the server makes of a plain upload)
before it sends: then every coordinate of w_k·Δ_k is at most ‖Δ_k‖₂ ≤ U (w_k ≤ 1), so nothing is
clipped; a site whose update is beyond the bound raises instead of sending (`masked_input`) and
drops out of the round with that message.

Levels and modulus. The masks live modulo M = 2³²; the unmasked sum of N sites' levels (each in
[0, T]) and of their weights q_k ≤ T must stay below M, so T = min(2³⁰, ⌊(M − 1)/N⌋) (2³⁰ keeps
Flower's int32 quantiser safe). Exactness (`Quantisation.bound`): per coordinate,

    |Δ̄_secagg − Σ_k p_k·Δ_k| ≤ 3·N·R / (T·W),   W = Σ_k q_k / T,

from N stochastic roundings of step 2R/T (≤ 2R/T each) and the weights' rounding
(|q_k/T − n_k/n_max| ≤ 1/(2T), at most N·R/(T·W) in total); with 3 sites, R = 1 and equal
sizes, about 2.8·10⁻⁹ — far below the DP noise a site adds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from fedlora.errors import FederationError
from fedlora.methods import keys
from fedlora.methods.base import Method, State

MODULUS = 2 ** 32
MAX_LEVELS = 2 ** 30  # Flower's stochastic rounding casts to int32


@dataclass(frozen=True)
class Quantisation:
    """SecAgg+'s parameters for one round of `sites` sites."""

    range: float  # R: each coordinate of w_k·Δ_k must lie in [−R, R]
    levels: int  # T: quantisation levels over [−R, R]
    modulus: int  # M: masks and sums are taken modulo M
    max_weight: int  # n_max: weights are n_k / n_max ≤ 1
    threshold: int  # t: shares needed to rebuild a dropped site's masks
    sites: int  # N: sites asked this round

    @classmethod
    def choose(cls, max_update_norm: float, sizes: list[int]) -> "Quantisation":
        """R = U (no admissible update is clipped), T as large as the modulus allows for N
        sites, n_max the largest site, t = max(2, ⌈2N/3⌉) (a third may drop out)."""
        n = len(sizes)
        if n < 3 or min(sizes) < 1:
            raise FederationError(f"secure aggregation needs at least 3 sites with examples in "
                                  f"a round; {n} can take part (sizes {sizes}) — restart the "
                                  "missing SuperNodes and resume the run")
        levels = min(MAX_LEVELS, (MODULUS - 1) // n)
        return cls(float(max_update_norm), levels, MODULUS, max(sizes), max(2, math.ceil(2 * n / 3)), n)

    def weight(self, n: int) -> float:
        """w_k = round(T·n_k/n_max)/T, the weight Flower's mod applies before masking."""
        return round(n / self.max_weight * self.levels) / self.levels

    def bound(self, sizes: list[int]) -> float:
        """The largest difference, per coordinate, between the unmasked mean of the updates of
        sites of these `sizes` and their exact weighted mean: 3·N·R/(T·W)."""
        total = sum(self.weight(n) for n in sizes)
        return 3 * len(sizes) * self.range / (self.levels * total) if total else math.inf

    def config(self) -> dict:
        return {"range": self.range, "levels": self.levels, "modulus": self.modulus,
                "max-weight": self.max_weight, "threshold": self.threshold}


class RangeError(ValueError):
    """A site's weighted update lies beyond the quantisation range: it is not sent."""


class SummedUploads:
    """Which tensors a round's uploads hold, in which order, and relative to what — the same on
    the server and at every site (both hold the method and the initial adapter)."""

    def __init__(self, method: Method, template: State):
        """`template`: every tensor a client can hold (`validate.template_state`)."""
        self.method = method
        self.template = template

    def keys(self, round: int) -> list[str]:
        """The uploaded keys of `round`, sorted: the order of Flower's parameter list."""
        return sorted(self.method.upload(self.template, round))

    def reference(self, key: str, sent: State) -> torch.Tensor:
        """s[key]: what the site was sent, or a zero change for a base weight it was not sent."""
        if key in sent:
            return sent[key]
        if keys.is_base(key):
            like = self.template[key]
            return torch.zeros(like.shape, dtype=like.dtype)
        raise FederationError(f"{key} is uploaded but was never sent: it has no reference to "
                              "take the update from")

    def masked_input(self, upload: State, sent: State, round: int, q: Quantisation) -> list[np.ndarray]:
        """Δ_k per key in `keys` order, as float64 arrays. Raises `RangeError` if ‖Δ_k‖₂ > R =
        `federation.max_update_norm`: the check the server makes of a plain upload
        (validate.py), made here because the server no longer sees Δ_k. Passing it, every
        coordinate of w_k·Δ_k is within ±R (|w_k·Δ| ≤ |Δ| ≤ ‖Δ_k‖₂), so Flower clips nothing."""
        arrays = [(_f64(upload[k]) - _f64(self.reference(k, sent))).numpy()
                  for k in self.keys(round)]
        norm = math.sqrt(sum(float((a * a).sum()) for a in arrays))
        if not norm <= q.range:
            raise RangeError(f"round {round + 1}: this site's update norm {norm:.4g} exceeds the "
                             f"secure-aggregation range {q.range:g} (federation.max_update_norm) "
                             "— not sent, it would be clipped; raise federation.max_update_norm")
        return arrays

    def zeros(self, round: int) -> list[np.ndarray]:
        """A site that sits the round out (weight 0) still masks a vector of the right shapes."""
        return [np.zeros(tuple(self.template[k].shape)) for k in self.keys(round)]

    def summed_state(self, arrays: list[np.ndarray], sent: State, round: int) -> State:
        """s + Δ̄ per key, in each tensor's dtype: the weighted mean of the uploads."""
        names = self.keys(round)
        if len(arrays) != len(names):
            raise FederationError(f"round {round + 1}: the secure sum holds {len(arrays)} tensors, "
                                  f"expected {len(names)}")
        out = {}
        for key, arr in zip(names, arrays):
            ref = self.reference(key, sent)
            mean = ref.to("cpu", torch.float64) + torch.from_numpy(np.asarray(arr, dtype=np.float64))
            out[key] = mean.to(ref.dtype)
        return out


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to("cpu", torch.float64)
