"""GaLore: the projection and the projected Adam step against a direct reference, and the
federated method's exact FedAvg of full-weight deltas on a real (tiny) run."""

from __future__ import annotations

import math

import pytest
import torch

from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import build_experiment
from fedlora.methods import keys
from fedlora.methods.base import Update
from fedlora.optim.galore import GaLoreAdam, projector


def test_the_projector_spans_the_top_singular_subspace():
    g = torch.randn(6, 10, dtype=torch.float64)
    p, left = projector(g, 3)
    u, s, vh = torch.linalg.svd(g)
    assert left and p.shape == (6, 3)
    assert torch.allclose(p @ p.T, u[:, :3] @ u[:, :3].T, atol=1e-10)
    q, left = projector(g.T, 3)  # more rows than columns: the right singular vectors
    assert not left and q.shape == (6, 3)
    assert torch.allclose(q @ q.T, u[:, :3] @ u[:, :3].T, atol=1e-10)


def reference_galore(w0, grads, lr, rank, every, scale, b1=0.9, b2=0.999, eps=1e-8):
    """Algorithm 2 of the paper, written out step by step."""
    w, m, v, p = w0.clone(), None, None, None
    rows, cols = w.shape
    for t, g in enumerate(grads, start=1):
        if (t - 1) % every == 0:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
            p = u[:, :rank] if rows <= cols else vh[:rank].T
        r = p.T @ g if rows <= cols else g @ p
        m = (1 - b1) * r if m is None else b1 * m + (1 - b1) * r
        v = (1 - b2) * r * r if v is None else b2 * v + (1 - b2) * r * r
        n = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
        w = w - lr * scale * (p @ n if rows <= cols else n @ p.T)
    return w


@pytest.mark.parametrize("shape", [(6, 10), (10, 6)])
def test_the_projected_adam_step_matches_the_algorithm(shape):
    torch.manual_seed(0)
    w0 = torch.randn(*shape, dtype=torch.float64)
    bias0 = torch.randn(shape[0], dtype=torch.float64)
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(5)]
    bias_grads = [torch.randn(shape[0], dtype=torch.float64) for _ in range(5)]
    w, bias = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(bias0.clone())
    opt = GaLoreAdam([w, bias], lr=0.1, rank=2, update_every=2, scale=0.25)
    for g, gb in zip(grads, bias_grads):
        w.grad, bias.grad = g.clone(), gb.clone()
        opt.step()
    want = reference_galore(w0, grads, 0.1, 2, 2, 0.25)
    assert torch.allclose(w.detach(), want, atol=1e-10)
    adam_bias = torch.nn.Parameter(bias0.clone())  # non-matrices: plain Adam
    adam = torch.optim.Adam([adam_bias], lr=0.1)
    for gb in bias_grads:
        adam_bias.grad = gb.clone()
        adam.step()
    assert torch.allclose(bias.detach(), adam_bias.detach(), atol=1e-10)


@pytest.fixture(scope="module")
def galore_exp(tiny_overrides):
    return build_experiment(load_config(None, tiny_overrides + [
        "method.name=galore", "method.rank=4", "method.galore_update_every=10",
        "train.lr=0.01"]))


def test_galore_trains_the_target_matrices_in_a_low_rank_subspace_and_averages_them(galore_exp):
    exp = galore_exp
    m = exp.method
    glob = m.init_global(exp.initial)
    replies = [exp.trainer.train(c, m.download(glob, c.cid), 0) for c in exp.clients]
    up = replies[0].upload
    targets = [k for k in up if keys.is_base(k)]
    assert len(targets) == 4 and all(".query." in k or ".value." in k for k in targets)  # 2 layers
    assert all(keys.is_base(k) or keys.is_head(k) for k in up)  # no LoRA factor travels
    for k in targets:  # one projector for the round (refresh every 10 > 2 steps): rank ≤ 4
        assert 0 < torch.linalg.matrix_rank(up[k].double(), atol=1e-7) <= 4
    updates = [Update(r.client, r.upload, r.num_examples) for r in replies]
    new = m.aggregate(glob, updates, 0)
    w = [u.num_examples / sum(x.num_examples for x in updates) for u in updates]
    for k in targets:
        want = sum(p * u.state[k].double() for p, u in zip(w, updates))
        assert torch.allclose(new.base_delta[k].double(), want, atol=1e-7)
    handle = exp.trainer.handle
    handle.install({**exp.initial, **new.tensors()})
    k = targets[0]
    assert torch.allclose(handle.base[k].detach(), handle._w0[k] + new.base_delta[k], atol=1e-6)
    assert all(float(v.abs().sum()) == 0 for key, v in handle.state().items() if keys.is_lora_b(key))


def test_galore_is_refused_with_another_optimizer(tiny_overrides):
    with pytest.raises(ConfigError, match="projected Adam"):
        load_config(None, tiny_overrides + ["method.name=galore", "train.optimizer=sgd"])
    with pytest.raises(ConfigError, match="galore_update_every"):
        load_config(None, tiny_overrides + ["method.name=galore", "method.galore_update_every=0"])
