"""One shared table: EVERY registered method, DP on and off, 3 clients, 2 rounds, tiny model.

A new method file is tested here automatically (the table iterates the registry): the run
completes, every payload has the right keys, shapes and finite values, the byte counts equal
the serialised payloads, and the exported adapter (plus base changes) reproduces the accuracy.
"""

from __future__ import annotations

import math

import pytest
import torch

import fedlora
import fedlora.api
from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.federation.simulation import InProcessTransport
from fedlora.federation.wire import payload_bytes
from fedlora.methods import available_methods, chain, keys, lowrank
from fedlora.mixture import MIXTURE_FILE
from fedlora.predict import _load_mixture

METHODS = available_methods()
#: what a method needs beyond its name: its rank, where it is defined at one (xgblora: 1)
NEEDS = {n: [f"method.rank={fedlora.methods.method_class(n).fixed_rank}"] for n in METHODS
         if fedlora.methods.method_class(n).fixed_rank is not None}


@pytest.fixture(scope="module")
def table_overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "data.group_column=film",
            "federation.rounds=2", "federation.local_steps=2", "train.batch_size=16",
            "train.micro_batch_size=8", "train.eval_batch_size=64", "threads=1"]


class Recorder(InProcessTransport):
    """The in-process transport, keeping a copy of every download and upload."""

    log: list = []

    def exchange(self, round, downloads):
        ex = super().exchange(round, downloads)
        Recorder.log.append((round, dict(downloads), {r.client: r.upload for r in ex.replies}))
        return ex


def _run(overrides, out, monkeypatch):
    Recorder.log = []
    monkeypatch.setattr(fedlora.api, "InProcessTransport", Recorder)
    summary = fedlora.run(None, out, overrides=overrides, progress=None)
    return summary, list(Recorder.log)


def _expected_shape(shape, key, rank):
    return lowrank.slice_to_rank({key: torch.empty(shape)}, rank)[key].shape


def _check_payloads(exp, log, summary):
    method, shapes = exp.method, exp.trainer.handle.shapes()
    down = up = 0
    for round, downloads, uploads in log:
        for cid, state in downloads.items():
            down += payload_bytes(state)
            rank = method.client_rank(cid)
            for k, v in state.items():
                own = chain.unlink(k)[1] if chain.is_link(k) else k  # a merged link: its factor's key
                assert v.shape == _expected_shape(shapes[own], own, rank), (k, v.shape)
                assert torch.isfinite(v).all(), k
                assert not method.personal(k)
        for cid, state in uploads.items():
            up += payload_bytes(state)
            assert state, f"client {cid} uploaded nothing in round {round}"
            rank = method.client_rank(cid)
            for k, v in state.items():
                assert method.trainable(k, round) and method.communicated(k) and not method.personal(k)
                assert v.shape == _expected_shape(shapes[k], k, rank), (k, v.shape)
                assert torch.isfinite(v).all(), k
    assert summary["bytes_downloaded"] == down
    assert summary["bytes_uploaded"] == up


def _exported_accuracy(exp, out, adapter_dir, evaluator):
    """Accuracy of the exported files loaded the documented way, on `evaluator`'s examples."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from fedlora.model import apply_base_delta

    base = AutoModelForSequenceClassification.from_pretrained(exp.model_path, num_labels=2)
    if (out / "base_delta.safetensors").exists():
        apply_base_delta(base, out / "base_delta.safetensors")
    if (adapter_dir / MIXTURE_FILE).exists():  # a mixture of experts (mole): no PEFT form
        model = _load_mixture(base, adapter_dir / MIXTURE_FILE, exp.config).eval()
    else:
        model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    handle_model = evaluator.handle.model
    evaluator.handle.model = model
    try:
        preds, _ = evaluator.predict()
    finally:
        evaluator.handle.model = handle_model
    return (preds == evaluator.labels).float().mean().item()


@pytest.mark.parametrize("dp", [True, False], ids=["dp", "nodp"])
@pytest.mark.parametrize("name", METHODS)
def test_every_method(name, dp, table_overrides, tmp_path, monkeypatch):
    overrides = (table_overrides + [f"method.name={name}"] + NEEDS.get(name, [])
                 + ([] if dp else ["privacy.epsilon=inf"]))
    summary, log = _run(overrides, tmp_path / "run", monkeypatch)
    assert summary["rounds"] == 2 and summary["method"] == name
    assert summary["rejected"] == {}  # every honest update passes the server's validation
    assert math.isfinite(summary["test_accuracy"]) and 0 <= summary["test_accuracy"] <= 1
    assert (0 < summary["epsilon"] <= 3.0) if dp else math.isinf(summary["epsilon"])
    exp = build_experiment(load_config(None, overrides))
    assert len(log) == 2 and all(len(d) == 3 for _, d, _ in log)
    _check_payloads(exp, log, summary)
    out = tmp_path / "run"
    if exp.method.personalised:
        per_client = summary["test_accuracy_per_client"]
        assert len(per_client) == 3
        assert summary["test_accuracy"] == pytest.approx(sum(per_client) / 3)
        for k, evaluator in enumerate(exp.evaluators[0].evaluators):
            acc = _exported_accuracy(exp, out, out / "clients" / str(k) / "adapter", evaluator)
            assert acc == pytest.approx(per_client[k], abs=1e-6)
    else:
        acc = _exported_accuracy(exp, out, out / "adapter", exp.evaluators[0])
        assert acc == pytest.approx(summary["test_accuracy"], abs=1e-6)


RANKED = [n for n in METHODS if fedlora.methods.method_class(n).supports_client_ranks]


@pytest.mark.parametrize("name", RANKED)
def test_unequal_ranks_run_with_dp(name, table_overrides, tmp_path, monkeypatch):
    """Rank-r_k clients upload rank-r_k factors only; the masked coordinates never move."""
    overrides = table_overrides + [f"method.name={name}", "method.client_ranks=[2, 4, 8]"]
    summary, log = _run(overrides, tmp_path / "run", monkeypatch)
    assert summary["rejected"] == {}  # rank-r_k uploads are what validation expects of r_k
    exp = build_experiment(load_config(None, overrides))
    _check_payloads(exp, log, summary)
    for _, _, uploads in log:
        for cid, state in uploads.items():
            for k, v in state.items():
                if lowrank.rank_dim(k) is not None:
                    assert v.shape[lowrank.rank_dim(k)] == [2, 4, 8][cid]


def test_masked_coordinates_stay_zero_under_dp(table_overrides):
    """A rank-2 client on the rank-8 model: B's columns ≥ 2 stay exactly zero after DP steps
    (noise there is discarded), A's rows ≥ 2 are zero in its forward pass."""
    exp = build_experiment(load_config(None, table_overrides + ["method.name=lora",
                                                                 "method.client_ranks=[2, 4, 8]",
                                                                 "method.name=flora"]))
    glob = exp.method.init_global(exp.initial)
    client = exp.clients[0]
    reply = exp.trainer.train(client, exp.method.download(glob, 0), 0)
    live = exp.trainer.handle.state()
    moved = False
    for k, v in live.items():
        if keys.is_lora_b(k):
            assert v[:, 2:].abs().sum() == 0
            moved |= bool(v[:, :2].abs().sum() > 0)
        if keys.is_lora_a(k):
            assert v[2:].abs().sum() == 0
            assert torch.equal(reply.upload[k], v[:2])
    assert moved, "the first 2 columns of B must have trained"


def test_client_ranks_rejected_where_unsupported():
    from fedlora.errors import ConfigError

    for name in METHODS:
        if name in RANKED:
            continue
        with pytest.raises(ConfigError, match="method.client_ranks.*" + "|".join(RANKED[:1])):
            load_config(None, [f"method.name={name}", "method.client_ranks=[4, 8, 16]"])
    with pytest.raises(ConfigError, match="one rank per client"):
        load_config(None, ["method.name=flora", "method.client_ranks=[4, 8]"])
    with pytest.raises(ConfigError, match="method.head"):
        load_config(None, ["method.head=mine"])
