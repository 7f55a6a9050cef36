"""The command line: bad input gives one clear message, exit code 2, and writes nothing."""

from __future__ import annotations

import os

import pytest

from fedlora.cli import main

BAD_CONFIG = [
    # (overrides, words the message must contain)
    (["federation.clientz=3"], ["federation.clientz", "did you mean", "federation.clients"]),
    (["nonsense=1"], ["unknown config key 'nonsense'"]),
    (["federation.clients=three"], ["federation.clients", "integer"]),
    (["privacy.epsilon=[1]"], ["privacy.epsilon", "number"]),
    (["privacy.epsilon=0"], ["privacy.epsilon", "> 0"]),
    (["privacy.epsilon=-1"], ["privacy.epsilon"]),
    (["privacy.epsilon=nan"], ["privacy.epsilon", "NaN"]),
    (["privacy.delta=1.5"], ["privacy.delta"]),
    (["method.rank=0"], ["method.rank", "≥ 1"]),
    (["method.name=nope"], ["method.name", "ffa", "lora"]),
    (["data.partition=random"], ["data.partition", "iid"]),
    (["data.test_fraction=1.2"], ["data.test_fraction"]),
    (["train.lr=-0.1"], ["train.lr"]),
    (["privacy.clip=0"], ["privacy.clip"]),
    (["novalue"], ["section.key=value"]),
]


def _run(argv, capsys):
    code = main(argv)
    err = capsys.readouterr().err
    return code, err


@pytest.mark.parametrize("overrides,words", BAD_CONFIG)
def test_bad_config_values(overrides, words, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _run(["run", "--out", "out", *overrides], capsys)
    assert code == 2
    assert err.startswith("fedlora: error:") and err.count("\n") == 1, err
    for w in words:
        assert w in err, (w, err)
    assert os.listdir(tmp_path) == []


def test_data_and_model_errors(tmp_path, capsys, monkeypatch, tiny_overrides, toy_csv):
    monkeypatch.chdir(tmp_path)
    cases = [
        (["data.path=missing.csv"], ["data.path", "missing.csv", "not found"]),
        (["data.label_column=stars"], ["stars", "sentiment"]),
        (["data.text_column=body"], ["body", "review"]),
        (["federation.clients=500"], ["federation.clients", "examples"]),
        (["model.path=no/such/model"], ["model.path", "not found"]),
        ([f"model.path={tmp_path}"], ["model.path", "config.json"]),
        (["method.target_modules=[\"nope\"]"], ["method.target_modules", "nope"]),
    ]
    for extra, words in cases:
        code, err = _run(["run", "--out", "out", *tiny_overrides, *extra], capsys)
        assert code == 2, (extra, err)
        assert err.count("\n") == 1 and "Traceback" not in err, err
        for w in words:
            assert w in err, (extra, w, err)
        assert os.listdir(tmp_path) == [], extra


def test_missing_and_malformed_config_file(tmp_path, capsys):
    code, err = _run(["run", "--config", str(tmp_path / "nope.toml")], capsys)
    assert code == 2 and "nope.toml" in err and "not found" in err
    bad = tmp_path / "bad.toml"
    bad.write_text("[privacy\nepsilon = 3\n")
    code, err = _run(["run", "--config", str(bad)], capsys)
    assert code == 2 and "not valid TOML" in err


def test_existing_out_folder_is_not_overwritten(tmp_path, capsys, tiny_overrides):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("precious")
    code, err = _run(["run", "--out", str(tmp_path / "taken"), *tiny_overrides], capsys)
    assert code == 2 and "already exists" in err
    assert (tmp_path / "taken" / "keep.txt").read_text() == "precious"


def test_methods_and_config_commands(capsys):
    assert main(["methods"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    from fedlora.methods import available_methods, method_class
    assert sorted(lines) == available_methods()
    for name, line in lines.items():  # what each method works with, from its class
        assert ("method.chain_every" in line) == method_class(name).supports_chains
        assert ("method.client_ranks" in line) == method_class(name).supports_client_ranks
    assert "chain_every" in lines["ffa"] and "chain_every" not in lines["fedsa"]
    assert main(["config", "privacy.epsilon=inf"]) == 0
    assert "epsilon = inf" in capsys.readouterr().out


def test_cli_run_prints_rounds_and_summary(tmp_path, capsys, tiny_overrides):
    assert main(["run", "--out", str(tmp_path / "r"), *tiny_overrides]) == 0
    out = capsys.readouterr().out
    assert "round   1/2" in out and "round   2/2" in out
    assert "test accuracy" in out and "ε spent" in out
    assert (tmp_path / "r" / "summary.json").exists()


@pytest.mark.parametrize("acc, warned", [(0.578, True), (0.422, True), (0.582, True), (0.6, False)])
def test_summary_warns_when_the_model_learnt_nothing(acc, warned):
    """At or below the majority class's accuracy (+0.005), the summary says so and what to try."""
    from fedlora.report import summary_table
    s = {"method": "lora", "test_accuracy": acc, "test_loss": 0.69, "majority_accuracy": 0.578,
         "epsilon": 3.0, "epsilon_target": 3.0, "delta": 1e-5, "accountant": "rdp",
         "epsilon_per_client": [3.0], "noise_multiplier": [1.0], "rounds": 5, "rounds_planned": 5,
         "steps": [20], "trainable_parameters": 10, "bytes_uploaded": 1, "bytes_downloaded": 1,
         "wall_seconds": 1.0}
    text = summary_table(s)
    assert ("no better than always answering the majority class (0.5780)" in text) == warned
    assert ("smaller train.lr or method.alpha" in text) == warned


def test_config_explain_covers_every_key_from_the_configs_own_metadata(capsys):
    from fedlora.config import Config, config_to_dict, flat_config

    assert main(["config", "--explain"]) == 0
    out = capsys.readouterr().out
    explained = [line.split(" (")[0] for line in out.splitlines() if not line.startswith(" ")]
    assert explained == list(flat_config(Config()))  # every key, in the file's order
    assert "privacy.epsilon (float, default 3.0)" in out
    assert main(["config", "--explain", "privacy"]) == 0
    section = capsys.readouterr().out
    assert all(line.startswith(("privacy.", " ")) for line in section.splitlines())
    assert len([x for x in section.splitlines() if not x.startswith(" ")]) == len(
        config_to_dict(Config())["privacy"])
    assert main(["config", "--explain", "privacy.epsilonn"]) == 2
    assert "did you mean 'privacy.epsilon'" in capsys.readouterr().err


def test_version(capsys):
    import fedlora

    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"fedlora {fedlora.__version__}"
