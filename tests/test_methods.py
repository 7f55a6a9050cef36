"""The two core methods against direct computations on real LoRA layers."""

from __future__ import annotations

import pytest
import torch

from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.federation.wire import payload_bytes
from fedlora.methods import available_methods, get_method
from fedlora.methods.aggregate import weighted_mean
from fedlora.methods.base import Update
from fedlora.methods.keys import is_head, is_lora_a, is_lora_b


def _trained_updates(overrides, method):
    """Build an experiment and let each client train one round from the same global state."""
    exp = build_experiment(load_config(None, overrides + [f"method.name={method}"]))
    glob = exp.method.init_global(exp.initial)
    glob = glob.with_adapter({k: (v + 0.1 if is_lora_b(k) else v) for k, v in glob.adapter.items()})
    replies = [exp.trainer.train(c, exp.method.download(glob, c.cid), 0) for c in exp.clients]
    updates = [Update(r.client, r.upload, r.num_examples) for r in replies]
    return exp, glob, updates, replies


def _lora_layers(model):
    return {name: m for name, m in model.named_modules() if hasattr(m, "get_delta_weight")
            and hasattr(m, "lora_A") and "default" in m.lora_A}


def _deltas(exp, adapter_state):
    """Effective ΔW = (α/r)·B·A of every LoRA layer, read from the PEFT layers themselves."""
    exp.trainer.handle.install({**exp.initial, **adapter_state})
    return {n: m.get_delta_weight("default").detach().clone() for n, m in _lora_layers(exp.model).items()}


def test_registry_has_core_methods():
    assert {"lora", "ffa"} <= set(available_methods())


@pytest.mark.parametrize("method,exact", [("ffa", True), ("lora", False)])
def test_aggregation_exactness_on_real_layers(tiny_overrides, method, exact):
    """FFA-LoRA: mean(B_k)·A == mean(B_k·A). FedIT: mean(B_k)·mean(A_k) ≠ mean(B_k·A_k).

    Each client's update moves every tensor its method trains by a random amount (as local
    training would); ΔW = (α/r)·B·A is read from PEFT's own layers for each client and for the
    aggregate.
    """
    exp = build_experiment(load_config(None, tiny_overrides + [f"method.name={method}"]))
    glob = exp.method.init_global(exp.initial)
    gen = torch.Generator().manual_seed(0)
    updates = []
    for c in exp.clients:
        local = {**exp.initial, **exp.method.download(glob, c.cid)}
        moved = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if exp.method.trainable(k, 0) else v
                 for k, v in local.items()}
        updates.append(Update(c.cid, exp.method.upload(moved, 0), c.num_examples))
    new = exp.method.aggregate(glob, updates, 0)
    weights = [u.num_examples for u in updates]
    per_client = [_deltas(exp, {**glob.adapter, **u.state}) for u in updates]
    of_aggregate = _deltas(exp, new.adapter)
    gaps = []
    for name, delta in of_aggregate.items():
        reference = sum(w * d[name] for w, d in zip(weights, per_client)) / sum(weights)
        gaps.append(((delta - reference).norm() / reference.norm()).item())
    assert len(gaps) == 4  # q and v in 2 layers
    if exact:
        assert max(gaps) < 1e-5
    else:
        assert min(gaps) > 1e-2


def test_clients_really_train(tiny_overrides):
    """One round of local training changes what the method trains, and nothing else."""
    for method in ("ffa", "lora"):
        exp, glob, updates, replies = _trained_updates(
            tiny_overrides + ["privacy.epsilon=inf", "train.optimizer=adam", "train.lr=0.05"], method)
        for u in updates:
            for k, v in u.state.items():
                assert exp.method.trainable(k, 0)
                assert not torch.equal(v, glob.adapter[k]), (method, k)


def test_every_client_holds_the_identical_A(tiny_overrides):
    """A comes from the shared seed: two independent builds (two 'sites') hold the same A."""
    a = build_experiment(load_config(None, tiny_overrides))
    b = build_experiment(load_config(None, tiny_overrides + ["data.partition=iid"]))
    a_keys = [k for k in a.initial if is_lora_a(k)]
    assert a_keys
    for k in a_keys:
        assert torch.equal(a.initial[k], b.initial[k])
        assert a.initial[k].abs().sum() > 0
    for k in a.initial:
        if is_lora_b(k):
            assert a.initial[k].abs().sum() == 0  # B starts at zero: ΔW = 0 at the start
    c = build_experiment(load_config(None, tiny_overrides + ["seed=7"]))
    assert not torch.equal(a.initial[a_keys[0]], c.initial[a_keys[0]])


def test_ffa_client_never_changes_A(tiny_overrides):
    exp, glob, updates, _ = _trained_updates(tiny_overrides, "ffa")
    state = exp.trainer.handle.state()
    for k, v in exp.initial.items():
        if is_lora_a(k):
            assert torch.equal(state[k], v)


def test_uploads_ffa_sends_only_B_and_head_about_half_of_lora(tiny_overrides):
    _, _, ffa, _ = _trained_updates(tiny_overrides, "ffa")
    _, _, lora, _ = _trained_updates(tiny_overrides, "lora")
    for u in ffa:
        assert u.state and all(is_lora_b(k) or is_head(k) for k in u.state)
        assert any(is_head(k) for k in u.state)
    for u in lora:
        assert any(is_lora_a(k) for k in u.state) and any(is_lora_b(k) for k in u.state)
    ratio = payload_bytes(ffa[0].state) / payload_bytes(lora[0].state)
    # B (d_out×r) and A (r×d_in) are the same size for square q/v; the head adds a little.
    assert 0.45 < ratio < 0.6


def test_fedavg_is_the_example_weighted_mean():
    states = [{"x": torch.tensor([1.0, 2.0])}, {"x": torch.tensor([3.0, 6.0])}]
    out = weighted_mean(states, [1, 3])
    assert torch.allclose(out["x"], torch.tensor([2.5, 5.0]))


def test_aggregate_is_pure_and_keeps_untrained_keys():
    from fedlora.config import MethodConfig
    from fedlora.methods.base import GlobalState

    method = get_method(MethodConfig(name="ffa"))
    glob = GlobalState({"m.lora_B.weight": torch.zeros(2, 2), "m.classifier.weight": torch.ones(2)})
    up = [Update(0, {"m.lora_B.weight": torch.ones(2, 2)}, 10),
          Update(1, {"m.lora_B.weight": 3 * torch.ones(2, 2)}, 30)]
    new = method.aggregate(glob, up, 0)
    assert torch.equal(glob.adapter["m.lora_B.weight"], torch.zeros(2, 2))  # input untouched
    assert torch.allclose(new.adapter["m.lora_B.weight"], 2.5 * torch.ones(2, 2))
    assert torch.equal(new.adapter["m.classifier.weight"], torch.ones(2))
