"""LoRA-Pro and LoRA-RITE (`fedlora.optim`) against slow, direct implementations of the papers'
equations on small random float64 matrices, their one-factor-frozen forms, LoRA-RITE's
invariance, a real federated run with each, and the refusals."""

from __future__ import annotations

import math

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import build_experiment
from fedlora.methods.keys import is_head, is_lora_a, is_lora_b
from fedlora.optim.lora_pro import LoRAPro, adjusted, equivalent_gradient
from fedlora.optim.lora_rite import LoRARITE
from fedlora.optim.pairs import LoRALayer

R, D_IN, D_OUT, S = 3, 6, 5, 0.7
F64 = torch.float64


def _rand(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=F64)


def _lora_map(A, B, s, train_a=True, train_b=True):
    """The matrix of (g_A, g_B) ↦ vec(s·(B·g_A + g_B·A)), built column by column."""
    cols = []
    for shape, on, apply in (((R, D_IN), train_a, lambda e: s * B @ e),
                             ((D_OUT, R), train_b, lambda e: s * e @ A)):
        if not on:
            continue
        for i in range(shape[0] * shape[1]):
            e = torch.zeros(shape[0] * shape[1], dtype=F64)
            e[i] = 1.0
            cols.append(apply(e.reshape(shape)).reshape(-1))
    return torch.stack(cols, dim=1)


def _split(vec, train_a=True, train_b=True):
    n_a = R * D_IN if train_a else 0
    ga = vec[:n_a].reshape(R, D_IN) if train_a else torch.zeros(R, D_IN, dtype=F64)
    gb = vec[n_a:].reshape(D_OUT, R) if train_b else torch.zeros(D_OUT, R, dtype=F64)
    return ga, gb


def _closest_optimum(A, B, s, G, ga, gb, train_a=True, train_b=True):
    """Among the minimisers of ‖s·(B·x_A + x_B·A) − G‖_F, the one closest to (g_A, g_B):
    min-norm correction of a least-squares problem, solved directly over the vectorised
    unknowns (LoRA-Pro's closed form with its optimal X must equal this)."""
    M = _lora_map(A, B, s, train_a, train_b)
    g = torch.cat([ga.reshape(-1)] * train_a + [gb.reshape(-1)] * train_b)
    best = M @ torch.linalg.lstsq(M, G.reshape(-1), driver="gelsd").solution  # optimal s(B x_A + x_B A)
    correction = torch.linalg.lstsq(M, best - M @ g, driver="gelsd").solution  # min-norm
    return _split(g + correction, train_a, train_b), best.reshape(D_OUT, D_IN)


def _factors(gen, zero_b=False):
    A, B = _rand(R, D_IN, gen=gen), _rand(D_OUT, R, gen=gen)
    return A, (torch.zeros_like(B) if zero_b else B)


# ------------------------------------------------------------------------------ LoRA-Pro


@pytest.mark.parametrize("seed,zero_b", [(0, False), (1, False), (2, True)])
def test_lora_pro_equivalent_gradient_is_the_least_squares_optimum(seed, zero_b):
    gen = torch.Generator().manual_seed(seed)
    A, B = _factors(gen, zero_b)
    G = _rand(D_OUT, D_IN, gen=gen)
    ga, gb = S * B.T @ G, S * G @ A.T  # the LoRA gradients of a full gradient G
    (want_a, want_b), best = _closest_optimum(A, B, S, G, ga, gb)
    got_a, got_b = adjusted(A, B, ga, gb, S)
    assert torch.allclose(equivalent_gradient(A, B, got_a, got_b, S), best, atol=1e-10)
    # and X (the Sylvester equation) picks the optimum closest to the plain LoRA gradients
    assert torch.allclose(got_a, want_a, atol=1e-9)
    assert torch.allclose(got_b, want_b, atol=1e-9)
    # the plain LoRA gradients are not optimal: the adjustment changes something
    assert not torch.allclose(equivalent_gradient(A, B, ga, gb, S), best, atol=1e-3)


def test_lora_pro_frozen_factor_forms():
    """A frozen (FFA-LoRA): g_B·(AAᵀ)⁻¹/s², the least-squares optimum over g_B alone.
    B frozen (RoLoRA's A rounds): (BᵀB)⁻¹·g_A/s²."""
    gen = torch.Generator().manual_seed(3)
    A, B = _factors(gen)
    G = _rand(D_OUT, D_IN, gen=gen)
    ga, gb = S * B.T @ G, S * G @ A.T
    got_a, got_b = adjusted(A, B, ga, gb, S, train_a=False)
    assert torch.allclose(got_b, gb @ torch.linalg.inv(A @ A.T) / S ** 2, atol=1e-10)
    assert torch.equal(got_a, torch.zeros_like(ga))
    (_, want_b), _ = _closest_optimum(A, B, S, G, ga, gb, train_a=False)
    assert torch.allclose(got_b, want_b, atol=1e-9)
    got_a, got_b = adjusted(A, B, ga, gb, S, train_b=False)
    assert torch.allclose(got_a, torch.linalg.inv(B.T @ B) @ ga / S ** 2, atol=1e-10)
    (want_a, _), _ = _closest_optimum(A, B, S, G, ga, gb, train_b=False)
    assert torch.allclose(got_a, want_a, atol=1e-9)


def _layer(A, B, train_a=True, train_b=True):
    return LoRALayer(torch.nn.Parameter(A.clone()), torch.nn.Parameter(B.clone()), S,
                     train_a, train_b)


def _reference_lora_pro(A, B, grads, lr, train_a=True, train_b=True, betas=(0.9, 0.999),
                        eps=1e-8):
    """The paper's LoRA-Pro with Adam, step by step, every projection a direct least-squares
    solve: Adam's moments of the optimal equivalent gradient; the Adam direction D mapped back
    to the optimal (g_A, g_B) closest to (s·Bᵀ·D, s·D·Aᵀ); a plain step."""
    m = v = torch.zeros(D_OUT, D_IN, dtype=F64)
    for t, G in enumerate(grads, start=1):
        ga, gb = S * B.T @ G, S * G @ A.T
        _, eq = _closest_optimum(A, B, S, G, ga, gb, train_a, train_b)
        m = betas[0] * m + (1 - betas[0]) * eq
        v = betas[1] * v + (1 - betas[1]) * eq * eq
        D = (m / (1 - betas[0] ** t)) / ((v / (1 - betas[1] ** t)).sqrt() + eps)
        (sa, sb), _ = _closest_optimum(A, B, S, D, S * B.T @ D, S * D @ A.T, train_a, train_b)
        A, B = A - lr * sa * train_a, B - lr * sb * train_b
    return A, B


def _run_optimizer(cls, layer, grads, lr, extra=()):
    opt = cls([layer], list(extra), lr=lr)
    for G in grads:
        A, B = layer.A.detach(), layer.B.detach()
        layer.A.grad = S * B.T @ G if layer.train_a else None
        layer.B.grad = S * G @ A.T if layer.train_b else None
        opt.step()
        opt.zero_grad()
    return layer.A.detach(), layer.B.detach()


@pytest.mark.parametrize("train_a", [True, False])
def test_lora_pro_step_is_the_papers_adam_on_the_equivalent_gradient(train_a):
    """Four steps from B = 0 (the first step's singular BᵀB included) against the reference;
    with A frozen this is FFA-LoRA's form."""
    gen = torch.Generator().manual_seed(4)
    A, B = _factors(gen, zero_b=True)
    grads = [_rand(D_OUT, D_IN, gen=gen) for _ in range(4)]
    want_a, want_b = _reference_lora_pro(A, B, grads, 0.05, train_a=train_a)
    got_a, got_b = _run_optimizer(LoRAPro, _layer(A, B, train_a=train_a), grads, 0.05)
    assert torch.allclose(got_b, want_b, atol=1e-8)
    assert torch.allclose(got_a, want_a, atol=1e-8)
    assert not torch.equal(got_b, B) and torch.equal(got_a, A) != train_a


def test_the_head_gets_plain_adam():
    gen = torch.Generator().manual_seed(5)
    A, B = _factors(gen)
    for cls in (LoRAPro, LoRARITE):
        start = _rand(4, gen=gen)
        head, twin = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
        opt, adam = cls([_layer(A, B)], [head], lr=0.1), torch.optim.Adam([twin], lr=0.1)
        for _ in range(3):
            head.grad = _rand(4, gen=gen)
            twin.grad = head.grad.clone()
            opt.step()
            adam.step()
        assert torch.allclose(head.detach(), twin.detach(), atol=1e-12), cls
        assert not torch.equal(head.detach(), start)


# ------------------------------------------------------------------------------ LoRA-RITE


def _polar(O):
    """O = U·H with U orthonormal (d×r) and H symmetric r×r: a different basis than QR's."""
    u, sv, vh = torch.linalg.svd(O, full_matrices=False)
    return u @ vh, vh.T @ torch.diag(sv) @ vh


def _reference_rite(A, B, grads, lr, train_a=True, train_b=True, betas=(0.9, 0.999), eps=1e-6):
    """Algorithm 1 of LoRA-RITE written out, each factor with its rank last (F_B = B,
    F_A = Aᵀ), the other factor's basis from its polar decomposition (not QR: the update must
    not depend on which orthonormal basis is used)."""
    state = {"A": None, "B": None}

    def factor(name, g, other):
        U, Rm = _polar(other)
        Rinv = torch.linalg.inv(Rm)
        st = state[name] or {"t": 0, "V": torch.zeros(R, R, dtype=F64),
                             "M": torch.zeros_like(g), "U": torch.zeros_like(U), "rho": 0.0}
        st["t"] += 1
        t = st["t"]
        b1 = betas[0] * (1 - betas[0] ** (t - 1)) / (1 - betas[0] ** t)
        b2 = betas[1] * (1 - betas[1] ** (t - 1)) / (1 - betas[1] ** t)
        g_bar = g @ Rinv                                   # unmagnified gradient
        P = U.T @ st["U"]                                  # change of basis
        V_rot = P @ st["V"] @ P.T
        lam_old, lam_new = torch.linalg.eigvalsh(st["V"]), torch.linalg.eigvalsh(V_rot)
        d = max(0.0, min(float((lam_old - lam_new).max()), float(st["V"].trace() - V_rot.trace())))
        st["rho"] = b2 * (st["rho"] + d)                   # escaped mass
        st["V"] = b2 * V_rot + (1 - b2) * g_bar.T @ g_bar / g.shape[0]
        w, Q = torch.linalg.eigh(st["V"])
        S_bar = g_bar @ Q @ torch.diag(1 / ((w.clamp(min=0) + st["rho"]).sqrt() + eps)) @ Q.T
        st["M"] = b1 * st["M"] @ P.T + (1 - b1) * S_bar    # first moment
        st["U"] = U
        state[name] = st
        return -lr * st["M"] @ Rinv.T                      # magnitude restored

    for G in grads:
        ga, gb = S * B.T @ G, S * G @ A.T
        dB = factor("B", gb, A.T) if train_b else 0
        dA = factor("A", ga.T, B).T if train_a else 0
        A, B = A + dA, B + dB
    return A, B


@pytest.mark.parametrize("train_a,train_b", [(True, True), (False, True), (True, False)])
def test_lora_rite_step_is_algorithm_1(train_a, train_b):
    """Five steps with every basis moving (both trained), or one factor frozen (A frozen:
    FFA-LoRA's form, P = I and no escaped mass; B frozen: RoLoRA's A rounds)."""
    gen = torch.Generator().manual_seed(6)
    A, B = _factors(gen)
    grads = [_rand(D_OUT, D_IN, gen=gen) for _ in range(5)]
    want_a, want_b = _reference_rite(A, B, grads, 0.05, train_a, train_b)
    got_a, got_b = _run_optimizer(LoRARITE, _layer(A, B, train_a, train_b), grads, 0.05)
    assert torch.allclose(got_a, want_a, atol=1e-9)
    assert torch.allclose(got_b, want_b, atol=1e-9)
    assert torch.equal(got_a, A) != train_a and torch.equal(got_b, B) != train_b


def test_lora_rite_at_b_zero_moves_only_b():
    gen = torch.Generator().manual_seed(7)
    A, B = _factors(gen, zero_b=True)
    G = _rand(D_OUT, D_IN, gen=gen)
    got_a, got_b = _run_optimizer(LoRARITE, _layer(A, B), [G], 0.05)
    assert torch.equal(got_a, A) and torch.isfinite(got_b).all() and got_b.abs().sum() > 0


def _product_after(cls, A, B, grads, lr):
    """B·A after the optimizer's steps, each step's gradients those of the full gradient G_t
    at the current factors (g_A = s·Bᵀ·G, g_B = s·G·Aᵀ)."""
    a, b = _run_optimizer(cls, _layer(A, B), grads, lr)
    return b @ a


def test_lora_rite_is_invariant_to_the_factorisation_and_adam_is_not():
    """B·A = (B·T)(T⁻¹·A): the same product after three steps (the paper's transformation
    invariance). Adam, per entry, gives a different one."""
    gen = torch.Generator().manual_seed(8)
    A, B = _factors(gen)
    T = torch.linalg.qr(_rand(R, R, gen=gen))[0] @ torch.diag(torch.tensor([0.3, 1.0, 4.0], dtype=F64))
    grads = [_rand(D_OUT, D_IN, gen=gen) for _ in range(3)]
    one = _product_after(LoRARITE, A, B, grads, 0.05)
    two = _product_after(LoRARITE, torch.linalg.inv(T) @ A, B @ T, grads, 0.05)
    assert not torch.allclose(one, B @ A, atol=1e-3)  # it moved
    assert torch.allclose(one, two, atol=1e-9)

    def adam(A, B):
        layer = _layer(A, B)
        opt = torch.optim.Adam([layer.A, layer.B], lr=0.05)
        for G in grads:
            layer.A.grad, layer.B.grad = S * layer.B.detach().T @ G, S * G @ layer.A.detach().T
            opt.step()
        return (layer.B @ layer.A).detach()

    assert not torch.allclose(adam(A, B), adam(torch.linalg.inv(T) @ A, B @ T), atol=1e-3)


# ------------------------------------------------------------------------------ in a real run


@pytest.mark.parametrize("optimizer", ["lora_pro", "lora_rite"])
def test_ffa_client_round_moves_only_b_and_uploads_b_and_head(tiny_overrides, optimizer):
    exp = build_experiment(load_config(None, tiny_overrides + [
        "method.name=ffa", f"train.optimizer={optimizer}"]))
    glob = exp.method.init_global(exp.initial)
    for c in exp.clients:
        reply = exp.trainer.train(c, exp.method.download(glob, c.cid), 0)
        assert reply.upload and all(is_lora_b(k) or is_head(k) for k in reply.upload)
        assert any(is_head(k) for k in reply.upload)
        assert all(torch.isfinite(v).all() for v in reply.upload.values())
        assert any(not torch.equal(v, exp.initial[k]) for k, v in reply.upload.items()
                   if is_lora_b(k))
    state = exp.trainer.handle.state()
    assert all(torch.equal(state[k], v) for k, v in exp.initial.items() if is_lora_a(k))


@pytest.mark.parametrize("optimizer", ["lora_pro", "lora_rite"])
def test_rolora_rounds_move_only_their_factor(tiny_overrides, optimizer):
    """RoLoRA: B frozen in odd rounds — the optimizers' frozen-B form moves A alone."""
    exp = build_experiment(load_config(None, tiny_overrides + [
        "method.name=rolora", f"train.optimizer={optimizer}"]))
    glob = exp.method.init_global(exp.initial)
    start = {**exp.initial, **{k: v + 0.05 if is_lora_b(k) else v for k, v in glob.adapter.items()}}
    client = exp.clients[0]
    for round, moved in ((0, is_lora_b), (1, is_lora_a)):
        reply = exp.trainer.train(client, {k: v for k, v in start.items() if k in glob.adapter}, round)
        state = exp.trainer.handle.state()
        for k in state:
            if is_lora_a(k) or is_lora_b(k):
                assert torch.equal(state[k], start[k]) != moved(k), (round, k)
        assert all(torch.isfinite(v).all() for v in reply.upload.values())


@pytest.mark.parametrize("method", ["ffa", "lora"])
@pytest.mark.parametrize("optimizer", ["lora_pro", "lora_rite"])
def test_a_federated_run_finishes_with_finite_results(tiny_overrides, tmp_path, method, optimizer):
    summary = fedlora.run(None, tmp_path / "run", progress=None, overrides=tiny_overrides + [
        f"method.name={method}", f"train.optimizer={optimizer}", "train.lr=0.005"])
    assert summary["rounds"] == 2 and summary["steps"] == [4, 4, 4]
    assert 0 <= summary["test_accuracy"] <= 1
    assert math.isfinite(summary["test_loss"])


# ------------------------------------------------------------------------------ refusals


@pytest.mark.parametrize("optimizer", ["lora_pro", "lora_rite"])
@pytest.mark.parametrize("extra", [["method.name=full"], ["method.name=head"],
                                   ["method.name=hetlora"],
                                   ["method.name=ffa", "method.client_ranks=[4, 8, 8]"]])
def test_refused_where_a_client_does_not_train_one_lora_pair(optimizer, extra):
    with pytest.raises(ConfigError, match=f"train.optimizer={optimizer} needs one LoRA"):
        load_config(None, extra + [f"train.optimizer={optimizer}"])


@pytest.mark.parametrize("method", ["lora", "ffa", "rolora", "flora", "fedsvd", "fedsa", "fedex",
                                    "fair", "flexlora"])
def test_accepted_for_every_single_rank_lora_method(method):
    for optimizer in ("lora_pro", "lora_rite"):
        assert load_config(None, [f"method.name={method}",
                                  f"train.optimizer={optimizer}"]).train.optimizer == optimizer


# ------------------------------------------------------------------------------ train.head_lr

HEAD_KEY = "base_model.model.classifier.modules_to_save.default.weight"
B_KEY = "base_model.model.encoder.layer.0.attention.self.query.lora_B.default.weight"
A_KEY = B_KEY.replace("lora_B", "lora_A")


@pytest.mark.parametrize("optimizer", ["adam", "sgd", "lora_pro", "lora_rite"])
def test_head_lr_steps_the_head_at_its_own_rate(optimizer):
    """Adam's first step moves every coordinate by lr·g/(|g| + ε) ≈ ±lr, SGD's by lr·g: the
    head's move measures its rate, whichever optimizer steps the factors."""
    from fedlora.config import TrainConfig
    from fedlora.optim.build import build_optimizer

    assert is_head(HEAD_KEY) and is_lora_b(B_KEY) and is_lora_a(A_KEY)
    gen = torch.Generator().manual_seed(0)
    params = {A_KEY: torch.nn.Parameter(torch.randn(2, 6, generator=gen)),
              B_KEY: torch.nn.Parameter(torch.zeros(5, 2)),
              HEAD_KEY: torch.nn.Parameter(torch.zeros(3, 4))}
    trained = [B_KEY, HEAD_KEY]
    opt = build_optimizer(TrainConfig(lr=1e-3, head_lr=0.05, optimizer=optimizer), params, trained, 0.5)
    head_grad = torch.full((3, 4), 0.5)
    params[B_KEY].grad = torch.randn(5, 2, generator=gen)
    params[HEAD_KEY].grad = head_grad.clone()
    opt.step()
    expected = -0.05 * (head_grad if optimizer == "sgd" else torch.ones(3, 4))
    torch.testing.assert_close(params[HEAD_KEY].detach(), expected, rtol=1e-5, atol=1e-9)  # ε of Adam: 1e-6 rel.
    moved = float(params[B_KEY].detach().abs().max())
    assert 0 < moved < 0.05  # B stepped at its own, smaller rate


def test_head_lr_zero_means_train_lr_and_galore_honours_it():
    from fedlora.config import MethodConfig, TrainConfig
    from fedlora.methods import get_method
    from fedlora.optim.build import build_optimizer

    head = torch.nn.Parameter(torch.zeros(3))
    opt = build_optimizer(TrainConfig(lr=0.01, optimizer="adam"), {HEAD_KEY: head}, [HEAD_KEY], 1.0)
    assert [g["lr"] for g in opt.param_groups] == [0.01]
    from fedlora.methods.keys import BASE

    weight = BASE + "base_model.model.encoder.layer.0.attention.self.query.base_layer.weight"
    galore = get_method(MethodConfig(name="galore", rank=2))
    opt = galore.local_optimizer({weight: torch.nn.Parameter(torch.zeros(4, 4)), HEAD_KEY: head}, 1e-4, 0.03)
    assert sorted(g["lr"] for g in opt.param_groups) == [1e-4, 0.03]


def test_head_lr_refused_when_negative_or_nan(tiny_overrides):
    for bad in ("-0.1", "nan"):
        with pytest.raises(ConfigError, match="train.head_lr"):
            load_config(None, [*tiny_overrides, f"train.head_lr={bad}"])
