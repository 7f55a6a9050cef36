"""Server optimizers (FedAvgM, FedAdam) against steps computed by hand, and in a real run."""

from __future__ import annotations

import json

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.federation.server_optimizer import ServerOptimizer, server_step
from fedlora.methods.base import GlobalState


def _glob(b, frozen=1.0, base=None):
    return GlobalState(adapter={"b": torch.tensor([b]), "a": torch.tensor([frozen])},
                       base_delta={} if base is None else {"w": torch.tensor([base])})


def test_avg_is_the_aggregate_itself():
    new = _glob(3.0)
    got, buffers = server_step(ServerOptimizer("avg"), _glob(1.0), new, {})
    assert got is new and buffers == {}


def test_momentum_by_hand():
    """β = 0.5, η = 2: Δ₁ = 1 → m = 1, x = 0 + 2 = 2; Δ₂ = 3 − 2 = 1 → m = 0.5 + 1 = 1.5,
    x = 2 + 3 = 5. A tensor that does not move (Δ = 0) stays; a new base change steps from 0."""
    opt = ServerOptimizer("momentum", lr=2.0, momentum=0.5)
    x, buf = server_step(opt, _glob(0.0), _glob(1.0, base=0.5), {})
    assert x.adapter["b"].item() == 2.0 and x.adapter["a"].item() == 1.0
    assert x.base_delta["w"].item() == 1.0  # Δ = 0.5 from an absent (zero) change, η = 2
    x, buf = server_step(opt, x, _glob(3.0, base=1.0), buf)
    assert x.adapter["b"].item() == 5.0 and buf["m:b"].item() == 1.5
    assert x.base_delta["w"].item() == pytest.approx(1.0 + 2 * (0.5 * 0.5 + 0.0))


def test_adam_by_hand():
    """β₁ = 0.9, β₂ = 0.99, τ = 1e-3, η = 0.1. Δ₁ = 2: m = 0.2, v = 0.04,
    x = 0.1·0.2/(0.2 + 0.001); then Δ₂ = −1 from there: m = 0.18 − 0.1 = 0.08,
    v = 0.0396 + 0.01 = 0.0496, x += 0.1·0.08/(√0.0496 + 0.001)."""
    opt = ServerOptimizer("adam", lr=0.1)
    x, buf = server_step(opt, _glob(0.0), _glob(2.0), {})
    x1 = 0.1 * 0.2 / (0.2 + 1e-3)
    assert x.adapter["b"].item() == pytest.approx(x1, rel=1e-6)
    assert x.adapter["a"].item() == 1.0  # frozen: m = 0, no step
    x, buf = server_step(opt, x, _glob(x1 - 1.0), buf)
    want = x1 + 0.1 * 0.08 / (0.0496 ** 0.5 + 1e-3)
    assert x.adapter["b"].item() == pytest.approx(want, rel=1e-6)
    assert buf["v:b"].item() == pytest.approx(0.0496, rel=1e-9)


def test_a_run_with_momentum_zero_and_lr_one_is_fedavg(tiny_overrides, tmp_path):
    """FedAvgM with β = 0, η = 1 takes exactly FedAvg's steps: the same adapter, bit for bit
    up to float rounding; FedAdam moves it elsewhere."""
    base = tiny_overrides + ["privacy.noise=seeded"]
    outs = {}
    for name, extra in {"avg": [], "m0": ["federation.server_optimizer=momentum",
                                          "federation.server_momentum=0"],
                        "adam": ["federation.server_optimizer=adam", "federation.server_lr=0.05"]}.items():
        fedlora.run(None, tmp_path / name, overrides=base + extra, progress=None)
        outs[name] = fedlora_adapter(tmp_path / name)
    for k in outs["avg"]:
        assert torch.allclose(outs["m0"][k], outs["avg"][k], atol=1e-6), k
    assert any(not torch.allclose(outs["adam"][k], outs["avg"][k], atol=1e-4) for k in outs["avg"])
    assert json.loads((tmp_path / "adam" / "summary.json").read_text())["test_accuracy"] >= 0


def fedlora_adapter(run):
    from safetensors.torch import load_file

    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.parametrize("method", ["fedsvd", "flora", "fedex"])
def test_methods_that_do_not_average_are_refused(tiny_overrides, method):
    with pytest.raises(ConfigError, match="does not average"):
        load_config(None, tiny_overrides + [f"method.name={method}", "federation.server_optimizer=adam"])
    with pytest.raises(ConfigError, match="chain_every"):
        load_config(None, tiny_overrides + ["federation.server_optimizer=momentum", "method.chain_every=1"])
