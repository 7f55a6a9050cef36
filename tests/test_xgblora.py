"""XGBLoRA (`method.name = "xgblora"`): rank-1 boosters merged one after another.

References: the merged weights recomputed by hand from each booster's factors as the clients
trained and the server averaged them (W0 + Σ_t s·b_t·a_t, read from PEFT's own layers); the
random layer selection against its definition (a SHA-256 coin per layer and booster); the
export against the run's own test loss (`fedlora predict`).
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import build_experiment
from fedlora.federation.wire import payload_bytes
from fedlora.methods import chain, keys
from fedlora.methods.base import Update
from fedlora.methods.xgblora import in_booster


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=3",
            "federation.local_steps=2", "train.batch_size=16", "threads=1",
            "federation.eval_examples=0", "privacy.noise=seeded", "method.name=xgblora",
            "method.rank=1"]


def _moved(exp, glob, round, seed):
    """Every client moves what it trains by N(0, 0.1²) from its download (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    m, updates = exp.method, []
    for c in exp.clients:
        local = m.client_state(exp.initial, {}, m.download(glob, c.cid), c.cid)
        local = {k: v + 0.1 * torch.randn(v.shape, generator=gen)
                 if m.trainable(k, round) and not chain.is_link(k) else v for k, v in local.items()}
        updates.append(Update(c.cid, m.upload(local, round), c.num_examples))
    return updates


def _weights(exp, state):
    """W0 + s·B·A + merged links of every LoRA layer, as the model computes it with `state`."""
    exp.trainer.handle.install(state)
    return {n: (mod.base_layer.weight + mod.get_delta_weight("default")).detach().double().clone()
            for n, mod in exp.model.named_modules()
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})}


def _boosters_by_hand(exp, fraction, rounds=3):
    """Run the server's side for `rounds` rounds; return the final global state and each
    booster's (a, b) per layer as averaged at its end (before the merge)."""
    m = exp.method
    glob = m.init_global(exp.initial)
    boosters = []
    for r in range(rounds):
        glob = m.aggregate(glob, _moved(exp, glob, r, seed=r), r)
        boosters.append({k: v.clone() for k, v in glob.adapter.items()
                         if keys.is_lora_a(k) or keys.is_lora_b(k)})
        glob = m.end_round(glob, r)
    return glob, boosters


def test_the_model_is_w0_plus_every_rank_1_booster(overrides):
    exp = build_experiment(load_config(None, overrides))
    m = exp.method
    assert m.chained and m.chain_period == 1  # chain_every = 0 means a booster per round
    glob, boosters = _boosters_by_hand(exp, 1.0)
    got = _weights(exp, m.client_state(exp.initial, {}, m.download(glob, 0), 0))
    handle = exp.trainer.handle
    for prefix, (a, b) in keys.lora_modules(exp.initial).items():
        assert exp.initial[a].shape[0] == 1 and exp.initial[b].shape[1] == 1  # rank 1
        w0 = handle._w0[keys.base_of(prefix)].double()
        want = w0 + sum(m.scaling * t[b].double() @ t[a].double() for t in boosters)
        layer = next(n for n in got if n.endswith(prefix.removeprefix("base_model.model.")))
        assert torch.allclose(got[layer], want, atol=1e-6)
        # three rank-1 boosters in different directions: the change has rank 3
        assert torch.linalg.matrix_rank(want - w0, atol=1e-8) == 3
        assert not glob.adapter[b].any()  # the next booster starts at zero


def test_in_booster_is_the_public_sha256_coin():
    layers = [f"base_model.model.bert.encoder.layer.{i}.attention.self.{n}"
              for i in range(40) for n in ("query", "value")]
    for t in (0, 3):
        want = [int.from_bytes(hashlib.sha256(f"fedlora/xgblora/{t}/{layer}".encode()).digest()[:8],
                               "big") / 2.0**64 < 0.5 for layer in layers]
        assert [in_booster(layer, t, 0.5) for layer in layers] == want
        assert 20 < sum(want) < 60  # about half of 80
    assert [in_booster(x, 0, 0.5) for x in layers] != [in_booster(x, 1, 0.5) for x in layers]
    assert all(in_booster(x, 7, 1.0) for x in layers)


def test_layers_outside_a_booster_are_neither_trained_nor_sent(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.boost_fraction=0.5"]))
    m = exp.method
    modules = keys.lora_modules(exp.initial)
    chosen = {t: {p for p in modules if in_booster(p, t, 0.5)} for t in range(3)}
    assert any(0 < len(c) < len(modules) for c in chosen.values())  # the tiny model has 4 layers
    glob = m.init_global(exp.initial)
    for r in range(3):
        updates = _moved(exp, glob, r, seed=r)
        for prefix, (a, b) in modules.items():
            assert (a in updates[0].state) == (prefix in chosen[r])
            assert (b in updates[0].state) == (prefix in chosen[r])
        assert any(keys.is_head(k) for k in updates[0].state)  # the head trains in every booster
        glob = m.end_round(m.aggregate(glob, updates, r), r)
    # merged boosters: link 0 whole (later a's are drawn from it), later ones only where trained
    for prefix, (a, b) in modules.items():
        assert chain.link_key(0, b) in glob.links
        for t in (1, 2):
            assert (chain.link_key(t, b) in glob.links) == (prefix in chosen[t])
            assert (chain.link_key(t, a) in glob.links) == (prefix in chosen[t])
        assert (glob.links[chain.link_key(0, b)].any()) == (prefix in chosen[0])


def test_xgblora_is_refused_where_it_cannot_work(overrides):
    for bad, why in [(["method.rank=8"], "defined at rank 1 — set method.rank=1"),
                     (["method.head=local"], "shared head"),
                     (["federation.server_optimizer=adam"], "does not average"),
                     (["method.boost_fraction=0"], r"\(0, 1\]"),
                     (["method.boost_fraction=1.5"], r"\(0, 1\]"),
                     (["method.name=lora", "method.rank=8", "method.boost_fraction=0.5"],
                      "xgblora's random layer selection")]:
        with pytest.raises(ConfigError, match=why):
            load_config(None, overrides + bad)


def test_a_private_xgblora_run_accounts_sends_rank_1_and_exports_what_it_trained(overrides, tmp_path,
                                                                                 predicted_test_loss):
    run = tmp_path / "run"
    summary = fedlora.run(None, run, overrides=overrides + ["privacy.epsilon=2"], progress=None)
    assert summary["epsilon"] <= 2.0 + 1e-9 and summary["epsilon"] > 1.5
    assert summary["method"] == "xgblora"
    config = load_config(run / "config.toml")
    exp = build_experiment(config)
    upload = {k: v for k, v in exp.initial.items() if not keys.is_statistic(k)}
    assert all(min(v.shape) == 1 for k, v in upload.items() if not keys.is_head(k))
    # each round every client uploads one rank-1 (a, b) per layer and the head, nothing else
    assert summary["bytes_uploaded"] == 3 * 3 * payload_bytes(upload)
    # the export (merged boosters in base_delta + the last, fresh booster) predicts as the run tested
    assert (run / "base_delta.safetensors").exists()
    assert predicted_test_loss(run) == pytest.approx(summary["test_loss"], abs=1e-5)
