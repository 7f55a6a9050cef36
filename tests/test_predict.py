"""Using a trained model: `fedlora predict`, `fedlora evaluate` and the model card, checked against
the run's own scores.

The reference is the run itself: its evaluator scored the held-out set inside the training
process (the live PEFT model with the global state installed); `predict` rebuilds the model
from the run folder alone, as a user would. Predicting the held-out texts must give the
accuracy the run reported.
"""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest

import fedlora
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.experiment import load_data, split_data
from fedlora.methods import method_class
from fedlora.tasks import get_task


@pytest.fixture(scope="module")
def runs(tiny_st_model_dir, toy_csv, tmp_path_factory):
    """A shared model with a base-weight change (fedex, no DP; the feature centre folded into
    the head) and a personalised one (fedsa, ε = 3)."""
    base = [f"model.path={tiny_st_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
            "federation.local_steps=2", "train.batch_size=16", "threads=1",
            "federation.eval_examples=0"]
    out = tmp_path_factory.mktemp("runs")
    made = {}
    for name, extra in {"shared": ["method.name=fedex", "privacy.epsilon=inf"],
                        "fedsa": ["method.name=fedsa"]}.items():
        fedlora.run(None, out / name, overrides=base + extra, progress=None)
        made[name] = out / name
    return made


def _held_out(run: Path) -> tuple[list[str], list[list[str]], list, object]:
    """The run's test texts and labels (shared, and per client for a personalised run)."""
    config = load_config(run / "config.toml")
    data = load_data(config, get_task(config))
    split = split_data(data, config, method_class(config.method.name).always_personalised)
    names = data.label_names
    pick = lambda ix: ([data.texts[i] for i in ix], [names[data.labels[i]] for i in ix])  # noqa: E731
    return pick(split.test), [pick(ix) for ix in split.client_test or []]


def _write(path: Path, texts: list[str]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([i, t] for i, t in enumerate(texts))
    return path


def _read(path: Path) -> list[dict]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_predictions_reproduce_the_runs_test_accuracy(runs, tmp_path, capsys):
    run = runs["shared"]  # fedex: a base-weight change (base_delta.safetensors) as well as the adapter
    assert (run / "base_delta.safetensors").exists()
    (texts, labels), _ = _held_out(run)
    out = tmp_path / "predictions.csv"
    assert main(["predict", str(run), "--input", str(_write(tmp_path / "in.csv", texts)),
                 "--out", str(out), "--batch-size", "7"]) == 0
    assert f"wrote {len(texts)} predictions" in capsys.readouterr().out
    rows = _read(out)
    summary = json.loads((run / "summary.json").read_text())
    assert list(rows[0]) == ["row", "label"] + [f"p_{n}" for n in summary["label_names"]]
    assert [int(r["row"]) for r in rows] == list(range(1, len(texts) + 1))  # input order
    for r in rows:
        probs = [float(r[f"p_{n}"]) for n in summary["label_names"]]
        assert sum(probs) == pytest.approx(1.0, abs=1e-5)
        assert r["label"] == summary["label_names"][probs.index(max(probs))]
    accuracy = sum(r["label"] == y for r, y in zip(rows, labels)) / len(labels)
    assert accuracy == pytest.approx(summary["test_accuracy"], abs=1e-6)  # float32 there
    # the run's mean cross-entropy: sensitive to every weight, not only to the argmax
    loss = -sum(math.log(float(r[f"p_{y}"])) for r, y in zip(rows, labels)) / len(labels)
    assert loss == pytest.approx(summary["test_loss"], abs=1e-5)


def test_a_personalised_run_predicts_with_each_sites_own_model(runs, tmp_path):
    run = runs["fedsa"]
    summary = json.loads((run / "summary.json").read_text())
    _, per_client = _held_out(run)
    for k, (texts, labels) in enumerate(per_client):
        out = tmp_path / f"client{k}.csv"
        assert main(["predict", str(run), "--input", str(_write(tmp_path / f"in{k}.csv", texts)),
                     "--out", str(out), "--client", str(k)]) == 0
        rows = _read(out)
        accuracy = sum(r["label"] == y for r, y in zip(rows, labels)) / len(labels)
        assert accuracy == pytest.approx(summary["test_accuracy_per_client"][k], abs=1e-6)  # float32 there


def _fails(argv: list[str], capsys, *needles: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("fedlora: error:")
    for needle in needles:
        assert needle in err


def test_bad_input_gets_one_message_and_writes_nothing(runs, tmp_path, capsys):
    good = _write(tmp_path / "in.csv", ["a fine film", "dull"])
    out = tmp_path / "out.csv"
    run = str(runs["shared"])
    _fails(["predict", str(tmp_path / "nope"), "--input", str(good), "--out", str(out)], capsys,
           "not found")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished)
    (unfinished / "summary.json").unlink()
    _fails(["predict", str(unfinished), "--input", str(good), "--out", str(out)], capsys,
           "not a finished run", "--resume")
    _fails(["predict", run, "--input", str(tmp_path / "missing.csv"), "--out", str(out)], capsys,
           "--input", "not found")
    _fails(["predict", run, "--input", str(good), "--text-column", "review", "--out", str(out)],
           capsys, "--text-column", "'review'", "'text'")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("text\nA moving, beautiful film.\n")
    _fails(["predict", run, "--input", str(ragged), "--out", str(out)], capsys, "--input: line 2",
           "double quotes")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    _fails(["predict", run, "--input", str(empty), "--out", str(out)], capsys, "empty")
    _fails(["predict", str(runs["fedsa"]), "--input", str(good), "--out", str(out)], capsys,
           "personalised", "--client")
    _fails(["predict", run, "--input", str(good), "--out", str(out), "--client", "0"], capsys,
           "drop --client")
    _fails(["predict", run, "--input", str(good), "--out", str(tmp_path / "no" / "out.csv")],
           capsys, "does not exist")
    assert not out.exists()
    out.write_text("keep me")
    _fails(["predict", run, "--input", str(good), "--out", str(out)], capsys, "exists")
    assert out.read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.csv", "in.csv", "out.csv", "ragged.csv",
                                                           "unfinished"]


def _front_matter(card: str) -> dict:
    import yaml

    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n")[1])


def test_the_adapter_carries_a_model_card_with_its_privacy_facts(runs):
    for name, run in runs.items():
        summary = json.loads((run / "summary.json").read_text())
        config = load_config(run / "config.toml")
        card = (run / "adapter" / "README.md").read_text()
        meta = _front_matter(card)
        assert meta["library_name"] == "peft"
        assert meta["base_model"] == config.model.path
        assert meta["pipeline_tag"] == "text-classification"
        assert f"method-{config.method.name}" in meta["tags"]
        private = not math.isinf(config.privacy.epsilon)
        assert ("differential-privacy" in meta["tags"]) == private
        if private:  # ε of every site as spent, δ, accountant, noise source, relation, sizes
            assert ", ".join(f"{e:.3f}" for e in summary["epsilon_per_client"]) in card
            assert f"δ = {config.privacy.delta:g}" in card and f"`{config.privacy.accountant}`" in card
            assert "secret key" in card and "add or remove one training example" in card
            assert ", ".join(str(n) for n in summary["client_sizes"]) in card
        else:
            assert "No differential privacy" in card
        assert f"{summary['test_accuracy']:.4f}" in card
        assert "fedlora run --config RUN/config.toml" in card
        assert ("--client K" in card) == (name == "fedsa")
    # a personalised run's per-site adapters carry the same facts, named for their site
    fedsa = runs["fedsa"]
    for k in range(3):
        own = (fedsa / "clients" / str(k) / "adapter" / "README.md").read_text()
        assert _front_matter(own)["library_name"] == "peft"
        assert f"site {k}'s own model" in own and f"fedlora predict RUN --client {k}" in own
        assert own.count("\n# ") == 1 and "## Privacy" in own and "secret key" in own


# ------------------------------------------------------------------------------ evaluate


def test_metrics_against_hand_computed_values():
    import numpy as np

    from fedlora.evaluate import calibration, confusion, expected_calibration_error, per_class

    truth = np.array([0, 0, 0, 1, 1, 2])
    predicted = np.array([0, 1, 0, 1, 0, 1])
    m = confusion(truth, predicted, 3)
    assert m.tolist() == [[2, 1, 0], [1, 1, 0], [0, 1, 0]]
    c = per_class(m)
    assert c["precision"].tolist() == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert c["recall"].tolist() == pytest.approx([2 / 3, 1 / 2, 0.0])
    assert c["f1"].tolist() == pytest.approx([2 / 3, 2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2), 0.0])
    assert c["support"].tolist() == [3, 2, 1]
    # two texts at confidence 0.95 (one right), two at 0.55 (both right)
    p = np.array([[0.95, 0.05], [0.95, 0.05], [0.55, 0.45], [0.45, 0.55]])
    bins = calibration(p, np.array([0, 1, 0, 1]))
    assert [b["count"] for b in bins] == [0, 0, 0, 0, 0, 2, 0, 0, 0, 2]
    assert expected_calibration_error(bins) == pytest.approx(0.5 * abs(1 - 0.55) + 0.5 * abs(0.5 - 0.95))


def test_evaluate_reproduces_the_run_and_writes_its_folder_whole(runs, tmp_path, capsys):
    run = runs["shared"]
    (texts, labels), _ = _held_out(run)
    data = tmp_path / "labelled.csv"
    with data.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["review", "sentiment"])
        w.writerows(zip(texts, labels))
    out = tmp_path / "eval"
    assert main(["evaluate", str(run), "--data", str(data), "--text-column", "review",
                 "--label-column", "sentiment", "--out", str(out)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert metrics["texts"] == len(texts)
    matrix = list(csv.reader((out / "confusion.csv").open()))
    assert sum(int(x) for row in matrix[1:] for x in row[1:]) == len(texts)
    for png in ("confusion.png", "reliability.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["metrics.json", "per_class.csv", "confusion.csv", "confusion.png", "calibration.csv",
         "reliability.png", "predictions.csv"])
    assert "accuracy" in capsys.readouterr().out
    # labels the run never saw: one message naming them, no folder
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\ngood film,pos\nawful,meh\n")
    _fails(["evaluate", str(run), "--data", str(bad), "--out", str(tmp_path / "e2")], capsys,
           "'meh'", "'neg', 'pos'")
    _fails(["evaluate", str(run), "--data", str(bad), "--label-column", "stars", "--out",
            str(tmp_path / "e2")], capsys, "--label-column", "'stars'")
    _fails(["evaluate", str(run), "--data", str(data), "--text-column", "review",
            "--label-column", "sentiment", "--out", str(out)], capsys, "exists")
    assert not (tmp_path / "e2").exists() and not (tmp_path / "e2.partial").exists()


# ------------------------------------------------------------------------------ merge


@pytest.fixture(scope="module")
def cls_run(tiny_model_dir, toy_csv, tmp_path_factory):
    """The model's own CLS head, chained FFA-LoRA: its merged links are a base-weight change."""
    out = tmp_path_factory.mktemp("cls") / "run"
    fedlora.run(None, out, progress=None, overrides=[
        f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
        "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
        "federation.local_steps=2", "train.batch_size=16", "threads=1", "method.chain_every=1",
        "privacy.epsilon=inf"])
    return out


@pytest.mark.parametrize("which", ["shared", "cls"])
def test_the_merged_folder_gives_the_adapters_logits(runs, cls_run, which, tmp_path, capsys):
    import torch
    from transformers import AutoModelForSequenceClassification

    from fedlora.merge import load_merged
    from fedlora.predict import load_trained

    run = runs["shared"] if which == "shared" else cls_run
    out = tmp_path / "merged"
    assert main(["merge", str(run), "--out", str(out)]) == 0
    assert "load it with" in capsys.readouterr().out
    clf = load_trained(run, device="cpu")
    batch = clf.tokenizer(["a fine and moving film", "dull and lifeless"], padding=True,
                          return_tensors="pt")
    merged = load_merged(out)
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        want = clf.model(**batch).logits
        got = merged(**batch).logits
    assert torch.allclose(got, want, atol=1e-5)
    if which == "cls":  # plain transformers, class names included
        plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
        with torch.no_grad():
            assert torch.allclose(plain(**batch).logits, want, atol=1e-5)
        assert plain.config.id2label == {0: "neg", 1: "pos"}
    _fails(["merge", str(run), "--out", str(out)], capsys, "exists")


def test_the_merged_folder_has_its_own_model_card(runs, tmp_path):
    """A merged folder is a plain transformers model: its card says so and carries the ε."""
    from fedlora.merge import merge_run

    out = merge_run(runs["shared"], tmp_path / "merged")
    text = (out / "README.md").read_text()
    assert "library_name: transformers" in text and "library_name: peft" not in text
    assert "model (adapter merged into" in text and "load_merged" in text
    summary = json.loads((runs["shared"] / "summary.json").read_text())
    from fedlora.config import load_config
    from fedlora.model import base_model_name
    from fedlora.modelcard import card

    config = load_config(runs["shared"] / "config.toml")
    assert text == card(config, summary, base_model_name(config.model.path), merged=True)  # the run's own facts
    assert ("No differential privacy" in text) == math.isinf(config.privacy.epsilon)


def test_merge_bad_input_and_a_failed_write_leave_nothing(runs, tmp_path, capsys, monkeypatch):
    import fedlora.merge as merge

    _fails(["merge", str(tmp_path / "nope"), "--out", str(tmp_path / "m")], capsys,
           "run folder", "not found")
    _fails(["merge", str(runs["shared"]), "--out", str(tmp_path / "no" / "m")], capsys,
           "does not exist")

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(merge, "_write_pooled", broken)
    with pytest.raises(OSError):
        merge.merge_run(runs["shared"], tmp_path / "m")
    assert sorted(p.name for p in tmp_path.iterdir()) == []
