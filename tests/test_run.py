"""A whole run on the tiny model: outputs, reproducibility, bytes, privacy, PEFT export."""

from __future__ import annotations

import json
import math

import pytest
import torch

import fedlora
from fedlora.config import load_config
from fedlora.experiment import build_experiment
from fedlora.federation.wire import payload_bytes


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """These tests compare runs bit for bit: seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


SUMMARY_KEYS = {"method", "test_accuracy", "epsilon", "delta", "noise_multiplier", "sample_rates",
                "steps", "rounds", "clients", "bytes_uploaded", "bytes_downloaded",
                "trainable_parameters", "wall_seconds"}
METRIC_KEYS = {"round", "test_accuracy", "test_loss", "epsilon", "bytes_uploaded"}


@pytest.fixture(scope="module")
def ffa_run(tmp_path_factory, request):
    overrides = request.getfixturevalue("tiny_overrides")
    out = tmp_path_factory.mktemp("runs") / "ffa"
    summary = fedlora.run(None, out, overrides=overrides, progress=None)
    return out, summary, overrides


def test_run_folder_is_complete(ffa_run):
    out, summary, _ = ffa_run
    assert {p.name for p in out.iterdir()} >= {"config.toml", "partition.json", "metrics.jsonl",
                                              "summary.json", "adapter"}
    on_disk = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(on_disk)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["round"] for x in lines] == [1, 2]
    assert all(METRIC_KEYS <= set(x) for x in lines)
    assert not list(out.parent.glob("*.partial")), "the in-progress folder must be gone"
    # the resolved config reproduces itself
    assert load_config(out / "config.toml") == load_config(None, ffa_run[2])


def test_privacy_in_summary(ffa_run):
    _, s, _ = ffa_run
    assert s["method"] == "ffa" and s["clients"] == 3 and s["rounds"] == 2
    assert s["steps"] == [4, 4, 4]
    assert 0 < s["epsilon"] <= 3.0
    assert all(0 < e <= 3.0 for e in s["epsilon_per_client"])
    assert all(sig > 0 for sig in s["noise_multiplier"])
    sizes = s["client_sizes"]
    assert s["sample_rates"] == pytest.approx([min(1.0, 16 / n) for n in sizes])


def test_bytes_match_the_serialised_payloads(ffa_run, tiny_overrides):
    _, s, _ = ffa_run
    exp = build_experiment(load_config(None, tiny_overrides))
    glob = exp.method.init_global(exp.initial)
    up = payload_bytes(exp.method.upload(exp.initial, 0))
    down = payload_bytes(exp.method.download(glob, 0))
    assert s["bytes_uploaded"] == 2 * 3 * up
    assert s["bytes_downloaded"] == 2 * 3 * down
    b_and_head = sum(v.numel() for k, v in exp.initial.items() if "lora_A" not in k)
    assert s["trainable_parameters"] == b_and_head
    assert up > 4 * b_and_head  # float32 payload plus the safetensors header


def test_same_seed_same_run(ffa_run, tmp_path):
    out, s1, overrides = ffa_run
    s2 = fedlora.run(None, tmp_path / "again", overrides=overrides, progress=None)
    strip = lambda s: {k: v for k, v in s.items() if k not in ("wall_seconds", "out")}  # noqa: E731
    assert strip(s1) == strip(s2)
    from safetensors.torch import load_file

    a = load_file(out / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "again" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    m1 = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()]
    for x, y in zip(m1, m2):
        x.pop("seconds"), y.pop("seconds")
        assert x == y


def test_exported_adapter_reproduces_predictions_through_peft(ffa_run, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    out, summary, overrides = ffa_run
    exp = build_experiment(load_config(out / "config.toml"))
    evaluator = exp.evaluators[0]
    # fedlora's own predictions with the final global adapter, read back from the adapter file
    from safetensors.torch import load_file

    saved = load_file(out / "adapter" / "adapter_model.safetensors")
    exp.trainer.handle.install({k: saved[k] for k in exp.initial})
    ours, _ = evaluator.predict()
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=2)
    peft_model = PeftModel.from_pretrained(base, out / "adapter").eval()
    from fedlora.data.batching import collate

    with torch.no_grad():
        theirs = torch.cat([peft_model(**collate(evaluator.token_ids, idx, 0)).logits.argmax(-1)
                            for idx in [list(range(len(evaluator.token_ids)))]])
    assert torch.equal(ours, theirs)
    acc = (theirs == evaluator.labels).float().mean().item()
    assert acc == pytest.approx(summary["test_accuracy"])


def test_lora_uploads_about_twice_ffa(ffa_run, tmp_path):
    _, ffa, overrides = ffa_run
    lora = fedlora.run(None, tmp_path / "lora", overrides=overrides + ["method.name=lora"],
                       progress=None)
    assert 1.7 < lora["bytes_uploaded"] / ffa["bytes_uploaded"] < 2.2


def test_non_private_run_reports_infinite_epsilon(tmp_path, tiny_overrides):
    s = fedlora.run(None, tmp_path / "np", overrides=tiny_overrides + ["privacy.epsilon=inf"],
                    progress=None)
    assert math.isinf(s["epsilon"]) and s["noise_multiplier"] == [0.0, 0.0, 0.0]
    assert json.loads((tmp_path / "np" / "summary.json").read_text())["epsilon"] == "inf"


def test_learns_without_dp(tmp_path, tiny_overrides):
    """The toy task is learnable: more rounds without DP reach high accuracy."""
    s = fedlora.run(None, tmp_path / "learn", progress=None, overrides=tiny_overrides + [
        "privacy.epsilon=inf", "federation.rounds=10", "federation.local_steps=5",
        "train.optimizer=adam", "train.lr=0.05", "data.partition=iid", "method.alpha=8"])
    assert s["test_accuracy"] >= 0.8


def test_crash_mid_run_leaves_no_run_folder_but_keeps_what_was_spent(tmp_path, tiny_overrides,
                                                                      monkeypatch):
    """The run folder never appears half-written; once clients have trained, their ledgers are
    kept in `crash.partial/` (ε they spent must not be forgotten) and the error says how to resume."""
    from fedlora.federation import evaluate

    def boom(self, glob, full=True):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(evaluate.Evaluator, "__call__", boom)
    with pytest.raises(RuntimeError) as info:
        fedlora.run(None, tmp_path / "crash", overrides=tiny_overrides + ["privacy.noise=secret"],
                    progress=None)
    assert [p.name for p in tmp_path.iterdir()] == ["crash.partial"]
    ledger = tmp_path / "crash.partial" / "ledger"
    assert sorted(p.name for p in ledger.glob("client-*.json")) == [
        "client-0.json", "client-1.json", "client-2.json"]
    assert len(list(ledger.glob("client-*.key"))) == 3  # the keys stay with the ledgers
    assert "--resume" in " ".join(info.value.__notes__)


def test_crash_before_any_training_leaves_nothing(tmp_path, tiny_overrides, monkeypatch):
    from fedlora.federation.client import LocalTrainer

    def boom(self, client, download, round):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(LocalTrainer, "train", boom)
    with pytest.raises(RuntimeError):
        fedlora.run(None, tmp_path / "crash", overrides=tiny_overrides, progress=None)
    assert list(tmp_path.iterdir()) == []


def test_client_refuses_to_train_beyond_its_budget(tiny_overrides):
    """Calibrated for 1 round of 2 steps; a second round would overspend ε, so it refuses."""
    exp = build_experiment(load_config(None, tiny_overrides + ["federation.rounds=1"]))
    glob = exp.method.init_global(exp.initial)
    client = exp.clients[0]
    first = exp.trainer.train(client, exp.method.download(glob, 0), 0)
    assert first.refused is None and 0 < first.epsilon <= 3.0
    second = exp.trainer.train(client, exp.method.download(glob, 0), 1)
    assert second.refused and "budget" in second.refused and second.upload == {}
    assert client.steps == 2 and client.privacy.spent() == pytest.approx(first.epsilon)
