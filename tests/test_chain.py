"""Chains of LoRA (`method.chain_every`): merges, exactness, the wire, resume and export.

References: the merged weights are recomputed by hand from the links' factors (W0 + Σ s·B_j·A_j,
read from PEFT's own layers); exactness against each client's own effective weights; the
export against the run's own test loss (`fedlora predict`); resume against an uninterrupted run.
"""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

import fedlora
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.experiment import build_experiment, load_data, split_data
from fedlora.federation.checkpoint import FILENAME, load_checkpoint
from fedlora.methods import chain, keys
from fedlora.methods.base import Update
from fedlora.tasks import get_task


@pytest.fixture(scope="module")
def overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=3",
            "federation.local_steps=2", "train.batch_size=16", "threads=1",
            "federation.eval_examples=0", "privacy.noise=seeded"]


def _moved(exp, glob, round, seed):
    """Every client moves what it trains by N(0, 0.1²) from its download (as training would)."""
    gen = torch.Generator().manual_seed(seed)
    m, updates, locals_ = exp.method, [], []
    for c in exp.clients:
        local = m.client_state(exp.initial, {}, m.download(glob, c.cid), c.cid)
        local = {k: v + 0.1 * torch.randn(v.shape, generator=gen) if m.trainable(k, round) and not
                 chain.is_link(k) else v for k, v in local.items()}
        locals_.append(local)
        updates.append(Update(c.cid, m.upload(local, round), c.num_examples))
    return updates, locals_


def _weights(exp, state):
    """W0 + Δ + s·B·A of every LoRA layer, as PEFT computes it with `state` installed."""
    exp.trainer.handle.install(state)
    return {n: (mod.base_layer.weight + mod.get_delta_weight("default")).detach().double().clone()
            for n, mod in exp.model.named_modules()
            if hasattr(mod, "get_delta_weight") and "default" in getattr(mod, "lora_A", {})}


@pytest.mark.parametrize("name", ["ffa", "lora"])
def test_merged_base_is_w0_plus_every_links_product(overrides, name):
    exp = build_experiment(load_config(None, overrides + [f"method.name={name}", "method.chain_every=1"]))
    m = exp.method
    glob = m.init_global(exp.initial)
    finished = []  # each link's (A, B) as the clients trained and the server averaged them
    for r in range(3):
        updates, _ = _moved(exp, glob, r, seed=r)
        glob = m.aggregate(glob, updates, r)
        finished.append({k: v.clone() for k, v in m.client_state(
            exp.initial, {}, m.download(glob, 0), 0).items() if keys.is_lora_a(k) or keys.is_lora_b(k)})
        glob = m.end_round(glob, r)
    assert chain.links_in(glob.links) == 3
    handle = exp.trainer.handle
    got = _weights(exp, m.client_state(exp.initial, {}, m.download(glob, 0), 0))
    for prefix, (a, b) in keys.lora_modules(exp.initial).items():
        w0 = handle._w0[keys.base_of(prefix)].double()
        want = w0 + sum(m.scaling * f[b].double() @ f[a].double() for f in finished
                        if not chain.is_link(a))
        name_in_model = prefix.removeprefix("base_model.model.")
        layer = next(n for n in got if n.endswith(name_in_model))
        assert torch.allclose(got[layer], want, atol=1e-6)
        # the links differ: each started from its own A
        assert not torch.equal(finished[0][a], finished[1][a])
        # and the new link starts at zero
        assert not glob.adapter[b].any()


def test_ffa_every_links_aggregation_is_exact_and_nothing_computable_is_sent(overrides):
    exp = build_experiment(load_config(None, overrides + ["method.name=ffa", "method.chain_every=1"]))
    m = exp.method
    glob = m.init_global(exp.initial)
    for r in range(3):
        download = m.download(glob, 0)
        assert not any(keys.is_lora_a(k) for k in download)  # no A, of any link, ever sent
        assert sum(chain.is_link(k) for k in download) == r * len(keys.lora_modules(exp.initial))
        updates, locals_ = _moved(exp, glob, r, seed=10 + r)
        new = m.aggregate(glob, updates, r)
        p = [u.num_examples / sum(v.num_examples for v in updates) for u in updates]
        each = [_weights(exp, local) for local in locals_]
        server = _weights(exp, {**exp.initial, **new.tensors()})
        for layer in server:
            mean = sum(w * e[layer] for w, e in zip(p, each))
            assert torch.allclose(server[layer], mean, atol=1e-6), (r, layer)
        glob = m.end_round(new, r)


def test_chains_are_refused_where_they_cannot_work(overrides):
    for bad, why in [(["method.name=fedsa"], "cannot be chained"),
                     (["method.name=ffa", "method.client_ranks=[2, 4, 8]"], "same rank"),
                     (["method.name=ffa", "method.head=local"], "shared head")]:
        with pytest.raises(ConfigError, match=why):
            load_config(None, overrides + bad + ["method.chain_every=2"])
    with pytest.raises(ConfigError, match="≥ 0"):
        load_config(None, overrides + ["method.chain_every=-1"])


def _held_out_csv(run, path):
    config = load_config(run / "config.toml")
    data = load_data(config, get_task(config))
    test = split_data(data, config).test
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text"])
        w.writerows([data.texts[i]] for i in test)
    return [data.label_names[data.labels[i]] for i in test]


def test_a_chained_run_resumes_across_a_link_boundary_and_exports_what_it_trained(
        overrides, tmp_path, interrupt_in_round):
    chained = overrides + ["method.name=ffa", "method.chain_every=2", "federation.rounds=4"]
    whole = fedlora.run(None, tmp_path / "whole", overrides=chained, progress=None)
    interrupt_in_round(tmp_path / "cut", chained, r=2)  # stopped as round 3 begins: link 0 merged
    saved = load_checkpoint(tmp_path / "cut.partial" / FILENAME)
    links = {k.removeprefix("links/"): v for k, v in saved.tensors.items() if k.startswith("links/")}
    assert saved.round == 2 and chain.links_in(links) == 1
    resumed = fedlora.run(resume=tmp_path / "cut", progress=None)
    assert resumed["test_accuracy"] == whole["test_accuracy"]
    assert resumed["test_loss"] == whole["test_loss"]
    assert resumed["bytes_downloaded"] == whole["bytes_downloaded"]
    # the export: base_delta.safetensors (both links merged) + the last, fresh adapter
    run = tmp_path / "whole"
    assert (run / "base_delta.safetensors").exists()
    labels = _held_out_csv(run, tmp_path / "test.csv")
    assert main(["predict", str(run), "--input", str(tmp_path / "test.csv"), "--out",
                 str(tmp_path / "p.csv")]) == 0
    with (tmp_path / "p.csv").open() as f:
        rows = list(csv.DictReader(f))
    loss = -sum(math.log(float(r[f"p_{y}"])) for r, y in zip(rows, labels)) / len(labels)
    summary = json.loads((run / "summary.json").read_text())
    assert loss == pytest.approx(summary["test_loss"], abs=1e-5)
