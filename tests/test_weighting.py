"""`federation.weighting = "inverse_noise"`: the minimum-variance weights of the clients' DP noise.

References: weights computed by hand from σ_k, q_k, n_k; the Lagrange optimum against random
weightings of the same noise variances; the weights the server actually used in a run, against
those recomputed from the run's own summary; the Flower reply against its public facts.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError, FederationError
from fedlora.federation.client import ClientReply
from fedlora.federation.flower import messages
from fedlora.federation.weighting import aggregation_weight, noise_scale
from fedlora.methods.base import Method


def _normalised(ws):
    return [w / sum(ws) for w in ws]


def test_weights_by_hand():
    # the default job's three clients: σ = 4.02, 0.80, 2.45 at the same expected batch 256
    sigma, n = [4.02, 0.80, 2.45], [471, 8879, 851]
    scales = [noise_scale(s, 256 / k, k) for s, k in zip(sigma, n)]
    assert scales == pytest.approx([s / 256 for s in sigma])
    w = _normalised([aggregation_weight("inverse_noise", i, k, s) for i, (k, s) in enumerate(zip(n, scales))])
    inv = [1 / s**2 for s in sigma]
    assert w == pytest.approx([x / sum(inv) for x in inv])
    assert w == pytest.approx([0.0346, 0.8724, 0.0930], abs=1e-4)  # by hand: (1/σ_k²) / Σ 1/σ_j²
    # examples weighting is FedAvg's n_k
    assert [aggregation_weight("examples", i, k, None) for i, k in enumerate(n)] == [471.0, 8879.0, 851.0]


def test_inverse_noise_weights_minimise_the_noise_variance():
    """Σ w_k² v_k over the simplex is smallest at w ∝ 1/v_k (Lagrange): no random weighting
    and not FedAvg's n_k does better."""
    gen = torch.Generator().manual_seed(0)
    v = torch.tensor([4.02, 0.80, 2.45, 1.3]) ** 2 / 256**2
    best = (1 / v) / (1 / v).sum()
    optimum = float((best**2 * v).sum())
    assert optimum == pytest.approx(float(1 / (1 / v).sum()))  # the closed form
    for _ in range(2000):
        w = torch.rand(4, generator=gen)
        w = w / w.sum()
        assert float((w**2 * v).sum()) >= optimum * (1 - 1e-9)
    n = torch.tensor([471.0, 8879.0, 851.0, 2000.0])
    assert float(((n / n.sum())**2 * v).sum()) > optimum


def test_a_client_without_noise_cannot_be_weighed_by_it():
    for scale in (None, 0.0, math.inf):
        with pytest.raises(FederationError, match="reported no DP noise"):
            aggregation_weight("inverse_noise", 2, 100, scale)


@pytest.fixture(scope="module")
def overrides(tiny_overrides):
    return tiny_overrides + ["privacy.noise=seeded", "federation.rounds=2"]


def test_the_server_aggregates_with_the_weights_of_the_clients_public_facts(overrides, tmp_path,
                                                                           monkeypatch):
    used = []
    original = Method.data_weights

    def spy(updates):
        weights = original(updates)
        used.append(_normalised(weights))
        return weights

    monkeypatch.setattr(Method, "data_weights", staticmethod(spy))
    summary = fedlora.run(None, tmp_path / "run", overrides=overrides + [
        "federation.weighting=inverse_noise", "method.name=ffa"], progress=None)
    sigma, q, n = summary["noise_multiplier"], summary["sample_rates"], summary["client_sizes"]
    want = _normalised([(qk * nk / sk) ** 2 for sk, qk, nk in zip(sigma, q, n)])
    assert len(used) >= 2 and len(set(sigma)) > 1  # the clients' noise differs
    for w in used:
        assert w == pytest.approx(want, rel=1e-9)
    assert want != pytest.approx(_normalised(n), rel=1e-3)  # not FedAvg's weights
    monkeypatch.undo()
    plain = fedlora.run(None, tmp_path / "plain", overrides=overrides + ["method.name=ffa"],
                        progress=None)
    assert plain["epsilon_per_client"] == summary["epsilon_per_client"]  # weights cost no ε
    assert plain["test_loss"] != summary["test_loss"]


def test_a_flower_reply_carries_the_noise_scale_of_its_public_facts():
    reply = ClientReply(client=2, upload={"b": torch.ones(2)}, num_examples=17, epsilon=1.0,
                        steps=4, train_loss=0.5)
    values, _ = messages.reply_record(reply, messages.SiteFacts(2, 17, 1.1, 0.25, ["neg", "pos"]))
    got, _, _ = messages.read_reply(values)
    assert got.noise_scale == pytest.approx(1.1 / (0.25 * 17))
    values, _ = messages.reply_record(reply, messages.SiteFacts(2, 17, 0.0, 0.25, ["neg", "pos"]))
    assert messages.read_reply(values)[0].noise_scale is None  # no DP, no noise scale


@pytest.mark.parametrize("extra, why", [
    (["privacy.epsilon=inf"], "adds none"),
    (["method.name=fedex"], "does not aggregate by a weighted mean"),
    (["federation.secure_aggregation=true", "federation.max_update_norm=1"], "before masking"),
    (["federation.weighting=variance"], "must be one of examples, inverse_noise"),
])
def test_inapplicable_weightings_are_refused(overrides, extra, why):
    with pytest.raises(ConfigError, match=why):
        load_config(None, overrides + ["federation.weighting=inverse_noise", *extra])
