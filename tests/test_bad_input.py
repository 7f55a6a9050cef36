"""Every bad input of the issue, fed to the command line: one clear line, exit code 2, and no
run folder appears (a resume folder is left exactly as it was)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

import fedlora
from fedlora.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir) -> Path:
    """Bad files of every kind, in a folder apart from the one the CLI runs in."""
    d = tmp_path_factory.mktemp("inputs")
    (d / "empty.csv").write_text("")
    (d / "header_only.csv").write_text("review,sentiment\n")
    (d / "one_class.csv").write_text("review,sentiment\n" + "fine film,pos\n" * 20)
    (d / "latin1.csv").write_bytes("review,sentiment\ncafé crème,pos\nbad,neg\n".encode("latin-1"))
    (d / "blank_text.csv").write_text("review,sentiment\ngood,pos\n   ,neg\nbad,neg\n")
    (d / "no_label.csv").write_text("review,stars\ngood,5\nbad,1\n")
    (d / "bad.jsonl").write_text('{"review": "good", "sentiment": "pos"}\n{"review": \n')
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "config.json").write_text("{not json")
    (d / "no_weights").mkdir()
    (d / "no_weights" / "config.json").write_text('{"model_type": "bert"}')
    for name in TOKENIZER_FILES:
        if (tiny_model_dir / name).exists():
            shutil.copy(tiny_model_dir / name, d / "no_weights" / name)
    _vision_model(d / "vision_model", tiny_model_dir)
    (d / "notes.txt").write_text("not a model")
    return d


def _vision_model(out: Path, tokenizer_dir: Path) -> None:
    """A loadable transformers model of the wrong task: an image encoder (no text classifier)."""
    from transformers import ViTConfig, ViTModel

    ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                       intermediate_size=64, image_size=32, patch_size=16)).save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (tokenizer_dir / name).exists():
            shutil.copy(tokenizer_dir / name, out / name)


BAD = [  # (case, overrides with {in} = the inputs folder, words the message must contain)
    # config
    ("unknown key", ["federation.clientz=3"], ["federation.clientz", "did you mean"]),
    ("unknown section", ["federaton.clients=3"], ["federaton"]),
    ("wrong type", ["federation.rounds=2.5"], ["federation.rounds", "integer"]),
    ("wrong type list", ["method.target_modules=query"], ["method.target_modules", "list"]),
    ("impossible value", ["federation.clients_per_round=9"], ["federation.clients_per_round"]),
    ("impossible epsilon", ["privacy.epsilon=-3"], ["privacy.epsilon", "> 0"]),
    ("bad-update policy", ["federation.on_bad_update=ignore"], ["federation.on_bad_update", "skip"]),
    ("negative norm bound", ["federation.max_update_norm=-1"], ["federation.max_update_norm"]),
    ("negative checkpoint_every", ["federation.checkpoint_every=-1"], ["federation.checkpoint_every"]),
    # data
    ("missing file", ["data.path={in}/nope.csv"], ["data.path", "not found"]),
    ("empty file", ["data.path={in}/empty.csv"], ["data.path", "empty"]),
    ("header only", ["data.path={in}/header_only.csv"], ["no data rows"]),
    ("missing column", ["data.path={in}/no_label.csv"], ["sentiment", "stars"]),
    ("single class", ["data.path={in}/one_class.csv"], ["only one class", "'pos'"]),
    ("non-UTF-8 bytes", ["data.path={in}/latin1.csv"], ["UTF-8", "latin1.csv"]),
    ("blank texts", ["data.path={in}/blank_text.csv"], ["blank", "review", "line 3"]),
    ("broken JSONL", ["data.path={in}/bad.jsonl"], ["bad.jsonl", "line 2"]),
    # model path
    ("model missing", ["model.path={in}/nowhere"], ["model.path", "not found"]),
    ("model is a file", ["model.path={in}/notes.txt"], ["model.path", "config.json"]),
    ("not a model", ["model.path={in}/not_a_model"], ["model.path", "config.json"]),
    ("no weights", ["model.path={in}/no_weights"], ["model.path", "model.safetensors"]),
    ("wrong task", ["model.path={in}/vision_model"], ["model.path", "sequence classifier"]),
]


def _cli(argv, capsys) -> tuple[int, str]:
    code = main(argv)
    return code, capsys.readouterr().err


def _one_clear_line(err: str, words) -> None:
    assert err.startswith("fedlora: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize("case,overrides,words", BAD, ids=[b[0] for b in BAD])
def test_bad_input(case, overrides, words, inputs, tiny_overrides, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["run", "--out", "out", *tiny_overrides, *(o.format(**{"in": inputs}) for o in overrides)]
    code, err = _cli(argv, capsys)
    assert code == 2, err
    _one_clear_line(err, words)
    assert os.listdir(tmp_path) == [], case


# ------------------------------------------------------------------------------ resume folders


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory, request) -> tuple[Path, list[str]]:
    """A run stopped after its first round's checkpoint (`run.partial/`)."""
    from fedlora.federation.client import LocalTrainer

    overrides = request.getfixturevalue("module_overrides")
    out = tmp_path_factory.mktemp("interrupted") / "run"
    train = LocalTrainer.train

    def crash(self, client, download, round):
        if round == 1:
            raise KeyboardInterrupt
        return train(self, client, download, round)

    LocalTrainer.train = crash
    try:
        with pytest.raises(KeyboardInterrupt):
            fedlora.run(None, out, overrides=overrides, progress=None)
    finally:
        LocalTrainer.train = train
    assert (out.parent / "run.partial" / "checkpoint.safetensors").exists()
    return out.parent / "run.partial", overrides


@pytest.fixture(scope="module")
def module_overrides(tiny_model_dir, toy_csv):
    return [f"model.path={tiny_model_dir}", "model.max_length=16", f"data.path={toy_csv}",
            "data.text_column=review", "data.label_column=sentiment", "federation.rounds=2",
            "federation.local_steps=2", "train.batch_size=16", "train.eval_batch_size=64",
            "threads=1"]


def _truncate(folder: Path) -> None:
    ckpt = folder / "checkpoint.safetensors"
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])


def _flip_a_byte(folder: Path) -> None:
    ckpt = folder / "checkpoint.safetensors"
    data = bytearray(ckpt.read_bytes())
    data[-5] ^= 0xFF  # inside the tensor data: the file still parses
    ckpt.write_bytes(bytes(data))


def _empty_checkpoint(folder: Path) -> None:
    (folder / "checkpoint.safetensors").write_bytes(b"")


def _config_edited(folder: Path) -> None:
    toml = folder / "config.toml"
    toml.write_text(toml.read_text().replace("rounds = 2", "rounds = 5"))


def _config_garbled(folder: Path) -> None:
    (folder / "config.toml").write_text("[federation\n")


def _ledger_garbled(folder: Path) -> None:
    (folder / "ledger" / "client-0.json").write_text('{"rounds": ')


RESUME = [  # (case, damage to the folder, extra CLI args, words)
    ("truncated checkpoint", _truncate, [], ["checkpoint", "corrupted or truncated"]),
    ("empty checkpoint", _empty_checkpoint, [], ["checkpoint", "corrupted or truncated"]),
    ("altered checkpoint", _flip_a_byte, [], ["checkpoint", "checksum"]),
    ("config.toml edited", _config_edited, [], ["another config", "changed by hand"]),
    ("config.toml garbled", _config_garbled, [], ["config.toml", "cannot be resumed"]),
    ("ledger garbled", _ledger_garbled, [], ["privacy ledger", "client-0.json"]),
    ("another config", None, ["privacy.epsilon=8"], ["another config", "privacy.epsilon"]),
    ("another config file", None, ["--config", "{defaults}"], ["another config", "data.text_column"]),
    ("with --out", None, ["--out", "elsewhere"], ["--resume", "--out"]),
]


@pytest.mark.parametrize("case,damage,extra,words", RESUME, ids=[r[0] for r in RESUME])
def test_bad_resume_folder(case, damage, extra, words, interrupted, tmp_path, capsys, monkeypatch):
    partial, overrides = interrupted
    work = tmp_path / "run.partial"
    shutil.copytree(partial, work)
    if damage:
        damage(work)
    monkeypatch.chdir(tmp_path)
    defaults = tmp_path / "defaults.toml"
    defaults.write_text("")  # a config file of all defaults: another model, data, rounds…
    args = [a.format(defaults=defaults) for a in extra]
    before = _snapshot(tmp_path)
    code, err = _cli(["run", "--resume", "run", *args], capsys)
    assert code == 2, err
    _one_clear_line(err, words)
    assert _snapshot(tmp_path) == before, "a refused resume must leave the folder as it was"


def test_resume_of_nothing_and_of_a_complete_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["run", "--resume", "ghost"], capsys)
    assert code == 2
    _one_clear_line(err, ["no interrupted run", "ghost.partial"])
    (tmp_path / "done").mkdir()
    code, err = _cli(["run", "--resume", "done"], capsys)
    assert code == 2
    _one_clear_line(err, ["complete run", "nothing to resume"])
    assert sorted(os.listdir(tmp_path)) == ["done"]


def test_fresh_run_over_an_interrupted_one_is_refused(interrupted, tmp_path, capsys, monkeypatch):
    partial, overrides = interrupted
    shutil.copytree(partial, tmp_path / "run.partial")
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["run", "--out", "run", *overrides], capsys)
    assert code == 2
    _one_clear_line(err, ["interrupted run", "--resume run"])
    assert os.listdir(tmp_path) == ["run.partial"]


def test_labels_only_in_test_are_refused():
    """The stratified split keeps every class in training (a 1-example class is never held
    out), so this guard protects other splits; it must still name the labels and the fix."""
    from fedlora.data.sources import TextDataset
    from fedlora.errors import DataError
    from fedlora.experiment import Split, _check_labels_seen

    ds = TextDataset(texts=["a", "b", "c", "d"], labels=[0, 0, 1, 2], label_names=["x", "y", "z"])
    with pytest.raises(DataError, match=r"\['z'\] appear only in the test set — every class"):
        _check_labels_seen(ds, Split(test=[3], validation=[], clients=[[0], [1, 2]]))


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
