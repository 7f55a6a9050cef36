"""Each method's defining property against a direct computation.

Client updates are made the way local training makes them (every tensor the method trains
moves, rank-r_k clients only within their rank) but with random moves, so every check is fast
and exact; effective weights are read from PEFT's own layers.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedlora.config import MethodConfig, load_config
from fedlora.experiment import build_experiment
from fedlora.methods import get_method, keys, lowrank
from fedlora.methods.base import GlobalState, Update
from fedlora.methods.fair import corrected_b


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
            "federation.local_steps=2", "train.batch_size=16", "threads=1"]


def random_updates(exp, glob, round=0, seed=0):
    """Every client moves what it trains by N(0, 0.1²), within its rank; returns updates."""
    gen = torch.Generator().manual_seed(seed)
    m, updates = exp.method, []
    for c in exp.clients:
        local = m.client_state(exp.initial, {}, m.download(glob, c.cid), c.cid)
        moved = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if m.trainable(k, round) else v
                 for k, v in local.items()}
        moved = lowrank.zero_beyond_rank(moved, m.client_rank(c.cid))
        updates.append(Update(c.cid, lowrank.slice_to_rank(m.upload(moved, round),
                                                           m.client_rank(c.cid)), c.num_examples))
    return updates


def effective(exp, state):
    """W0 + Δ + s·B·A of every LoRA layer, as PEFT computes it, with `state` installed."""
    exp.trainer.handle.install(state)
    return {n: (m.base_layer.weight + m.get_delta_weight("default")).detach().double().clone()
            for n, m in exp.model.named_modules()
            if hasattr(m, "get_delta_weight") and "default" in getattr(m, "lora_A", {})}


def p(updates):
    w = torch.tensor([float(u.num_examples) for u in updates], dtype=torch.float64)
    return (w / w.sum()).tolist()


def products(updates, a, b):
    return [u.state[b].double() @ u.state[a].double() for u in updates]


def rel(x, y):
    return float((x - y).norm() / y.norm())


# ------------------------------------------------------------------------------- FedEx-LoRA


@pytest.mark.parametrize("name,exact", [("fedex", True), ("lora", False)])
def test_fedex_global_effective_weight_is_the_mean_of_the_clients(overrides, name, exact):
    exp = build_experiment(load_config(None, overrides + [f"method.name={name}"]))
    glob = exp.method.init_global(exp.initial)
    for round in range(2):  # the second round starts from a base already changed
        updates = random_updates(exp, glob, round, seed=round)
        clients = [effective(exp, exp.method.client_state(
            exp.initial, {}, {**exp.method.download(glob, u.client), **u.state}, u.client))
            for u in updates]
        glob = exp.method.aggregate(glob, updates, round)
        merged = effective(exp, {**exp.initial, **glob.tensors()})
        gaps = [rel(merged[n], sum(w * c[n] for w, c in zip(p(updates), clients))) for n in merged]
        assert len(gaps) == 4
        assert (max(gaps) < 1e-6) if exact else (min(gaps) > 1e-4), gaps
    if exact:
        assert glob.base_delta and all(keys.is_base(k) for k in glob.base_delta)


# ------------------------------------------------------------------------------- FLoRA


def test_stacking_equals_the_weighted_sum_of_products_with_unequal_ranks():
    g = torch.Generator().manual_seed(1)
    ranks, w = [2, 3, 5], [10.0, 30.0, 60.0]
    As = [torch.randn(r, 7, generator=g) for r in ranks]
    Bs = [torch.randn(6, r, generator=g) for r in ranks]
    A, B = lowrank.stack(As, Bs, w)
    assert A.shape == (10, 7) and B.shape == (6, 10)
    direct = sum(wk / 100 * (Bk.double() @ Ak.double()) for Ak, Bk, wk in zip(As, Bs, w))
    assert torch.allclose(B @ A, direct, atol=1e-12)


def test_flora_merges_into_the_base_and_restarts_lora(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=flora",
                                                          "method.client_ranks=[2, 4, 8]"]))
    glob = exp.method.init_global(exp.initial)
    updates = random_updates(exp, glob)
    new = exp.method.aggregate(glob, updates, 0)
    s = exp.method.scaling
    for prefix, (a, b) in keys.lora_modules(exp.initial).items():
        direct = s * sum(w * P for w, P in zip(p(updates), products(updates, a, b)))
        assert torch.allclose(new.base_delta[keys.base_of(prefix)].double(), direct, atol=1e-6)
        assert torch.equal(new.adapter[a], exp.initial[a]) and new.adapter[b].abs().sum() == 0
    down = exp.method.download(new, 0)
    assert not any(keys.is_lora_a(k) or keys.is_lora_b(k) for k in down)
    assert any(keys.is_base(k) for k in down)


# ------------------------------------------------------------------------------- FlexLoRA


def test_flexlora_gives_each_client_the_best_rank_rk_approximation(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=flexlora",
                                                          "method.client_ranks=[2, 4, 8]"]))
    glob = exp.method.init_global(exp.initial)
    updates = random_updates(exp, glob)
    new = exp.method.aggregate(glob, updates, 0)
    for a, b in keys.lora_modules(exp.initial).values():
        delta = sum(w * P for w, P in zip(p(updates), products(updates, a, b)))
        S = torch.linalg.svdvals(delta)
        for c in exp.clients:
            r = exp.method.client_rank(c.cid)
            down = exp.method.download(new, c.cid)
            assert down[a].shape[0] == r and down[b].shape[1] == r
            err = (delta - down[b].double() @ down[a].double()).norm()
            # Eckart–Young: the best rank-r error is the norm of the dropped singular values
            assert float(err) == pytest.approx(float(S[r:].norm()), rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------- HetLoRA


def test_hetlora_pads_aggregates_and_truncates():
    method = get_method(MethodConfig(name="hetlora", rank=4, client_ranks=[1, 2, 4]))
    g = torch.Generator().manual_seed(2)
    a, b, h = "m.q.lora_A.weight", "m.q.lora_B.weight", "m.classifier.weight"
    glob = GlobalState({a: torch.zeros(4, 5), b: torch.zeros(3, 4), h: torch.zeros(2)})
    updates = [Update(k, {a: torch.randn(r, 5, generator=g), b: torch.randn(3, r, generator=g),
                          h: torch.randn(2, generator=g)}, n)
               for k, (r, n) in enumerate([(1, 10), (2, 20), (4, 30)])]
    new = method.aggregate(glob, updates, 0)
    norms = [float((u.state[b] @ u.state[a]).norm()) for u in updates]
    A_ref, B_ref = torch.zeros(4, 5), torch.zeros(3, 4)
    for u, w in zip(updates, norms):
        r = u.state[a].shape[0]
        A_ref[:r] += w / sum(norms) * u.state[a]
        B_ref[:, :r] += w / sum(norms) * u.state[b]
    assert torch.allclose(new.adapter[a], A_ref, atol=1e-6)
    assert torch.allclose(new.adapter[b], B_ref, atol=1e-6)
    assert torch.allclose(new.adapter[h], sum(n / 60 * u.state[h] for u, n in
                                              zip(updates, [10, 20, 30])), atol=1e-6)
    for k, r in enumerate([1, 2, 4]):
        down = method.download(new, k)
        assert torch.allclose(down[a], A_ref[:r], atol=1e-6) and down[a].shape == (r, 5)
        assert torch.allclose(down[b], B_ref[:, :r], atol=1e-6) and down[b].shape == (3, r)


# ------------------------------------------------------------------------------- FedSA-LoRA


def test_fedsa_never_uploads_B_and_each_client_keeps_its_own(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=fedsa", "privacy.epsilon=inf",
                                                          "train.optimizer=adam", "train.lr=0.05"]))
    glob = exp.method.init_global(exp.initial)
    assert not any(keys.is_lora_b(k) for k in glob.adapter)
    kept = {}
    for round in range(2):
        updates = []
        for c in exp.clients:
            down = exp.method.download(glob, c.cid)
            assert not any(keys.is_lora_b(k) for k in down)
            reply = exp.trainer.train(c, down, round)
            assert reply.upload and not any(keys.is_lora_b(k) for k in reply.upload)
            assert any(keys.is_lora_a(k) for k in reply.upload)
            live = exp.trainer.handle.state()
            for k in live:
                if keys.is_lora_b(k):
                    assert torch.equal(c.personal[k], live[k])  # what it trained, kept
                    if round == 1:  # it started round 1 from its own round-0 B
                        assert not torch.equal(c.personal[k], kept[c.cid][k])
            kept[c.cid] = dict(c.personal)
            updates.append(Update(c.cid, reply.upload, c.num_examples))
        glob = exp.method.aggregate(glob, updates, round)
    b = next(k for k in kept[0] if keys.is_lora_b(k))
    assert not torch.equal(kept[0][b], kept[1][b])


# ------------------------------------------------------------------------------- RoLoRA


def test_rolora_alternates_and_each_round_is_exact(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=rolora", "federation.rounds=3"]))
    m = exp.method
    glob = m.init_global(exp.initial)
    glob = glob.updated({k: v + 0.1 for k, v in glob.adapter.items() if keys.is_lora_b(k)})
    for round, trained in [(0, keys.is_lora_b), (1, keys.is_lora_a), (2, keys.is_lora_b)]:
        # the real trainer: only the round's factor changes
        c = exp.clients[0]
        before = m.client_state(exp.initial, {}, m.download(glob, 0), 0)
        exp.trainer.train(c, m.download(glob, 0), round)
        after = exp.trainer.handle.state()
        for k in before:
            if keys.is_lora_a(k) or keys.is_lora_b(k):
                assert torch.equal(before[k], after[k]) != trained(k), (round, k)
        updates = random_updates(exp, glob, round, seed=round)
        assert all(not (keys.is_lora_a(k) or keys.is_lora_b(k)) or trained(k)
                   for u in updates for k in u.state)
        full = [{**glob.adapter, **u.state} for u in updates]
        new = m.aggregate(glob, updates, round)
        for a, b in keys.lora_modules(exp.initial).values():
            direct = sum(w * (s[b].double() @ s[a].double()) for w, s in zip(p(updates), full))
            assert rel(new.adapter[b].double() @ new.adapter[a].double(), direct) < 1e-6
        glob = new


# ------------------------------------------------------------------------------- LoRA-FAIR


def test_fair_correction_is_least_squares_and_no_worse_than_fedit(overrides):
    fair = build_experiment(load_config(None, overrides + ["method.name=fair"]))
    fedit = get_method(fair.config.method.__class__(name="lora"))
    glob = fair.method.init_global(fair.initial)
    updates = random_updates(fair, glob)
    new, plain = fair.method.aggregate(glob, updates, 0), fedit.aggregate(glob, updates, 0)
    for a, b in keys.lora_modules(fair.initial).values():
        target = sum(w * P for w, P in zip(p(updates), products(updates, a, b)))
        assert torch.equal(new.adapter[a], plain.adapter[a])  # A is the plain average
        err_fair = (new.adapter[b].double() @ new.adapter[a].double() - target).norm()
        err_fedit = (plain.adapter[b].double() @ plain.adapter[a].double() - target).norm()
        assert err_fair <= err_fedit * (1 + 1e-9) and err_fair < 0.999 * err_fedit
        # against an independent solver: the normal equations B·(Ā·Āᵀ) = T·Āᵀ
        A = plain.adapter[a].double()
        assert torch.allclose(new.adapter[b].double() @ (A @ A.T), target @ A.T, atol=1e-5)
    assert corrected_b(torch.eye(3), torch.ones(2, 3)).shape == (2, 3)


# ------------------------------------------------------------------------------- FFA-LoRA


def test_ffa_with_unequal_ranks_is_exact(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=ffa",
                                                          "method.client_ranks=[2, 4, 8]"]))
    glob = exp.method.init_global(exp.initial)
    updates = random_updates(exp, glob)
    new = exp.method.aggregate(glob, updates, 0)
    for a, b in keys.lora_modules(exp.initial).values():
        A = exp.initial[a].double()
        direct = sum(w * (u.state[b].double() @ A[:u.state[b].shape[1]])
                     for w, u in zip(p(updates), updates))
        assert rel(new.adapter[b].double() @ A, direct) < 1e-6
    assert [u.state[b].shape[1] for u in updates] == [2, 4, 8]


# ------------------------------------------------------------------------------- FedSVD


def test_orthonormal_refactor_is_the_svd_of_the_product():
    """Against the dense SVD of B·A: same product, orthonormal rows of A', B' = U_r·S_r (so
    its column norms are the singular values, largest first), also for a rank-deficient B."""
    gen = torch.Generator().manual_seed(0)
    A, B = torch.randn(4, 30, generator=gen), torch.randn(20, 4, generator=gen)
    for b in (B, torch.cat([B[:, :2], torch.zeros(20, 2)], dim=1)):
        new_a, new_b = lowrank.orthonormal_refactor(A, b)
        product = (b @ A).double()
        assert rel(new_b.double() @ new_a.double(), product) < 1e-6
        assert torch.allclose(new_a @ new_a.T, torch.eye(4), atol=1e-6)
        assert torch.allclose(new_b.norm(dim=0).double(), torch.linalg.svdvals(product)[:4], atol=1e-5)
        assert torch.allclose(new_b.T @ new_b, torch.diag(new_b.norm(dim=0) ** 2), atol=1e-4)


def test_fedsvd_aggregate_is_ffas_model_with_an_orthonormal_A(overrides):
    """The clients' step is FFA-LoRA's (same trained and uploaded tensors); the server's model
    after aggregation is FFA-LoRA's exact average, re-factored: same effective weights, new A
    with orthonormal rows, sent down from then on (before, each client builds it from the seed)."""
    ffa = build_experiment(load_config(None, overrides + ["method.name=ffa"]))
    svd = build_experiment(load_config(None, overrides + ["method.name=fedsvd"]))
    m = svd.method
    glob = m.init_global(svd.initial)
    assert not any(keys.is_lora_a(k) for k in m.download(glob, 0))  # B = 0: A is the seed's
    updates = random_updates(svd, glob)
    assert [set(u.state) for u in updates] == [set(u.state) for u in random_updates(ffa, glob)]
    assert not any(keys.is_lora_a(k) for u in updates for k in u.state)
    new = m.aggregate(glob, updates, 0)
    reference = ffa.method.aggregate(ffa.method.init_global(ffa.initial), updates, 0)
    got, want = effective(svd, {**svd.initial, **new.tensors()}), effective(ffa, {**ffa.initial, **reference.tensors()})
    assert all(rel(got[n], want[n]) < 1e-6 for n in want)
    for a, b in keys.lora_modules(svd.initial).values():
        assert not torch.equal(new.adapter[a], svd.initial[a])  # A really moved
        assert torch.allclose(new.adapter[a] @ new.adapter[a].T, torch.eye(m.max_rank), atol=1e-5)
        assert torch.equal(m.download(new, 0)[a], new.adapter[a])


# ------------------------------------------------------------------------------- full


def test_full_fine_tuning_averages_the_weights(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=full", "privacy.epsilon=inf"]))
    m = exp.method
    glob = m.init_global(exp.initial)
    replies = [exp.trainer.train(c, m.download(glob, c.cid), 0) for c in exp.clients]
    emb = next(k for k in replies[0].upload if "word_embeddings" in k)
    assert all(keys.is_base(k) or keys.is_head(k) for k in replies[0].upload)
    assert replies[0].upload[emb].abs().sum() > 0  # the embeddings really trained
    updates = [Update(r.client, r.upload, r.num_examples) for r in replies]
    new = m.aggregate(glob, updates, 0)
    handle = exp.trainer.handle
    w0 = handle._w0[emb]
    weights = [w0 + u.state[emb] for u in updates]  # each client's trained weight
    fedavg = sum(w * W for w, W in zip(p(updates), weights))
    assert torch.allclose(w0 + new.base_delta[emb], fedavg.float(), atol=1e-6)
    handle.install({**exp.initial, **new.tensors()})
    assert torch.allclose(handle.base[emb].detach(), fedavg.float(), atol=1e-6)


# ------------------------------------------------------------------------------- head only


def test_head_only_trains_and_averages_only_the_head(overrides):
    """The linear-probe baseline: real DP training moves only the head, uploads only the head,
    and the server's head is Σ p_k·h_k; the encoder stays the pre-trained one (B = 0)."""
    exp = build_experiment(load_config(None, overrides + ["method.name=head"]))
    m = exp.method
    glob = m.init_global(exp.initial)
    assert set(m.download(glob, 0)) and all(keys.is_head(k) for k in m.download(glob, 0))
    replies = [exp.trainer.train(c, m.download(glob, c.cid), 0) for c in exp.clients]
    assert all(set(r.upload) == set(replies[0].upload) for r in replies)
    assert replies[0].upload and all(keys.is_head(k) for k in replies[0].upload)
    head = next(iter(replies[0].upload))
    assert not torch.equal(replies[0].upload[head], exp.initial[head])  # the head really trained
    updates = [Update(r.client, r.upload, r.num_examples) for r in replies]
    new = m.aggregate(glob, updates, 0)
    for k in replies[0].upload:
        want = sum(w * u.state[k].double() for w, u in zip(p(updates), updates))
        assert torch.allclose(new.adapter[k].double(), want, atol=1e-6)
    before = effective(exp, exp.initial)
    after = effective(exp, {**exp.initial, **new.tensors()})
    assert before.keys() and all(torch.equal(before[n], after[n]) for n in before)


def test_head_only_is_refused_where_there_is_no_shared_head(overrides):
    from fedlora.errors import ConfigError

    with pytest.raises(ConfigError, match="share"):
        load_config(None, overrides + ["method.name=head", "method.head=local"])
    causal = Path(__file__).parents[1] / "configs" / "causal_gsm.toml"
    with pytest.raises(ConfigError, match="a causal task has none"):
        load_config(causal, ["method.name=head"])
