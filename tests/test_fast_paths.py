"""The speed paths change nothing but speed: length-grouped micro-batches give the exact DP-SGD
gradient, the batches drawn are those `poisson_batches` names, and timing a run leaves it as
it was."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.federation.client import LocalTrainer
from fedlora.federation.server import FederationState, RoundPlan, run_rounds
from fedlora.federation.simulation import InProcessTransport


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


@pytest.fixture()
def exp(tiny_overrides):
    return build_experiment(load_config(None, tiny_overrides + ["train.micro_batch_size=3"]))


def _one_at_a_time(trainer: LocalTrainer, client, batch, keys, clip, expected):
    """Σ_i clip_C(∇L_i) / expected, each example alone in its own unpadded forward pass."""
    params = [trainer.handle.param(k) for k in keys]
    total = [torch.zeros_like(p) for p in params]
    for i in batch:
        grads = torch.autograd.grad(trainer.per_example_loss(client, [i]).sum(), params)
        norm = torch.sqrt(sum((g ** 2).sum() for g in grads))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        total = [t + factor * g for t, g in zip(total, grads)]
    return [t / expected for t in total]


def test_grouped_micro_batches_give_the_exact_private_gradient(exp):
    trainer, client = exp.trainer, exp.clients[0]
    client.privacy = dataclasses.replace(client.privacy, noise_multiplier=0.0)  # no noise: exact
    keys = trainer.handle.set_trainable(lambda k: exp.method.trainable(k, 0))
    exp.model.eval()  # no dropout: the two computations must see the same function
    lengths = sorted({len(t) for t in client.token_ids})
    batch = [next(i for i, t in enumerate(client.token_ids) if len(t) == n) for n in lengths]
    batch += list(range(12))
    chunks = trainer._micro_batches(client, batch)
    assert len(chunks) > 1 and all(len(c) <= 3 for c in chunks)
    assert sorted(i for c in chunks for i in c) == sorted(batch)
    trainer._step(client, batch, keys, torch.Generator().manual_seed(0))
    got = [trainer.handle.param(k).grad for k in keys]
    want = _one_at_a_time(trainer, client, batch, keys, client.privacy.clip,
                          client.privacy.sample_rate * client.num_examples)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-7)


def test_training_uses_the_batches_poisson_batches_names(exp, monkeypatch):
    trainer, client = exp.trainer, exp.clients[1]
    expected = trainer.poisson_batches(client, 3)
    assert len(expected) == trainer.local_steps and expected != trainer.poisson_batches(client, 4)
    seen = []
    original = LocalTrainer._step

    def spy(self, client, batch_idx, keys, noise, **audit):
        seen.append(list(batch_idx))
        return original(self, client, batch_idx, keys, noise, **audit)

    monkeypatch.setattr(LocalTrainer, "_step", spy)
    glob = exp.method.init_global(exp.initial)
    trainer.train(client, exp.method.download(glob, client.cid), 3)
    assert seen == expected


def _run(tiny_overrides, timings):
    exp = build_experiment(load_config(None, tiny_overrides))
    f = exp.config.federation
    plan = RoundPlan(f.rounds, f.clients, f.clients_per_round, f.eval_every, exp.config.seed)
    exp.trainer.timings = timings
    state = FederationState(glob=exp.method.init_global(exp.initial))
    run_rounds(exp.method, state, InProcessTransport(exp.trainer, exp.clients, timings=timings),
               plan, exp.evaluate, timings=timings)
    return state


def test_timing_a_run_changes_nothing_and_times_every_phase(tiny_overrides):
    timings: dict[str, float] = {}
    timed, plain = _run(tiny_overrides, timings), _run(tiny_overrides, None)
    for a, b in zip(timed.history, plain.history, strict=True):
        assert {k: v for k, v in a.items() if k != "seconds"} == \
               {k: v for k, v in b.items() if k != "seconds"}
    assert timed.glob.adapter.keys() == plain.glob.adapter.keys()
    for k in timed.glob.adapter:
        assert torch.equal(timed.glob.adapter[k], plain.glob.adapter[k])
    assert timings["rounds"] == 2
    for phase in ("download", "exchange", "validate", "aggregate", "evaluate", "report",
                  "checkpoint", "train", "serialise"):
        assert timings[phase] >= 0 and math.isfinite(timings[phase])
    assert timings["train"] + timings["serialise"] <= timings["exchange"]
