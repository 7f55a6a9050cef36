"""`fedlora sweep`: grid expansion, validation, skipping, resuming, learning-rate selection."""

from __future__ import annotations

import itertools
import json
import math
import os

import pytest

import fedlora
from fedlora.cli import main
from fedlora.config import load_config
from fedlora.errors import ConfigError
from fedlora.study import select as sel
from fedlora.study.grid import Selection, load_grid, parse_grid, parse_only
from fedlora.study.sweep import sweep


@pytest.fixture(scope="module")
def tiny_overrides(tiny_overrides):
    """Sweeps are studies: they compare runs bit for bit, with seeded DP noise (docs/privacy.md)."""
    return tiny_overrides + ["privacy.noise=seeded"]


def nested(overrides: list[str]) -> dict:
    """tiny_overrides as the nested dict a grid file parses to."""
    from fedlora.config import apply_override

    raw: dict = {}
    for item in overrides:
        apply_override(raw, item)
    return raw


# ---------------------------------------------------------------------------- expansion


def test_expansion_is_the_cartesian_product_seed_by_seed():
    grid = parse_grid({"seed": [0, 1, 2], "privacy": {"epsilon": [math.inf, 3.0]},
                       "method": {"name": ["lora", "ffa"], "rank": 4}})
    runs = grid.runs()
    got = [(r.config.seed, r.config.privacy.epsilon, r.config.method.name) for r in runs]
    want = set(itertools.product([0, 1, 2], [math.inf, 3.0], ["lora", "ffa"]))
    assert len(got) == 12 and set(got) == want
    assert [s for s, _, _ in got] == sorted(s for s, _, _ in got)  # all of seed 0 first
    assert all(r.config.method.rank == 4 for r in runs)           # a scalar is fixed
    assert len({r.name for r in runs}) == 12
    assert runs[0].name == "method=lora,epsilon=inf,seed=0"


def test_cases_are_alternatives_and_equal_configs_are_one_run():
    grid = parse_grid({"method": {"name": ["lora", "ffa"]}, "cases": [
        {"data": {"partition": "iid"}},
        {"data": {"partition": "dirichlet", "dirichlet_alpha": [1.0, 0.1]}},
        {"data": {"partition": "dirichlet", "dirichlet_alpha": 1.0}},   # same as a run above
        {"data": {"partition": "group"}},
    ]})
    runs = grid.runs()
    got = {(r.config.method.name, r.config.data.partition,
            r.config.data.dirichlet_alpha if r.config.data.partition == "dirichlet" else None)
           for r in runs}
    want = {(m, p, a) for m in ["lora", "ffa"]
            for p, a in [("iid", None), ("dirichlet", 1.0), ("dirichlet", 0.1), ("group", None)]}
    assert len(runs) == 8 and got == want
    names = {r.name for r in runs}
    assert "method=ffa,partition=iid" in names
    assert "method=lora,partition=dirichlet,dirichlet_alpha=0.1" in names


def test_groups_of_cases_are_crossed():
    grid = parse_grid({"cases": {
        "split": [{"data": {"partition": "iid"}},
                  {"data": {"partition": "dirichlet", "dirichlet_alpha": [1.0, 0.1]}}],
        "method": [{"method": {"name": "lora"}, "train": {"lr": [0.001, 0.002]}},
                   {"method": {"name": "ffa"}, "train": {"lr": 0.01}}]}})
    got = sorted((r.config.data.partition, r.config.data.dirichlet_alpha, r.config.method.name,
                  r.config.train.lr) for r in grid.runs())
    splits = [("iid", 0.5), ("dirichlet", 1.0), ("dirichlet", 0.1)]
    methods = [("lora", 0.001), ("lora", 0.002), ("ffa", 0.01)]
    assert got == sorted((p, a, m, lr) for p, a in splits for m, lr in methods)


def test_list_typed_keys_sweep_with_a_list_of_lists():
    fixed = parse_grid({"method": {"target_modules": ["query", "value"]}}).runs()
    assert len(fixed) == 1 and fixed[0].config.method.target_modules == ["query", "value"]
    swept = parse_grid({"method": {"target_modules": [["query"], ["query", "value"]]}}).runs()
    assert [r.config.method.target_modules for r in swept] == [["query"], ["query", "value"]]
    assert [r.name for r in swept] == ["target_modules=query", "target_modules=query+value"]


BAD_GRIDS = [
    ({"privacy": {"epsilom": [1, 3]}}, ["privacy.epsilom", "did you mean", "privacy.epsilon"]),
    ({"seed": []}, ["seed = []", "at least one value"]),
    ({"privacy": {"epsilon": [3, "x"]}}, ["privacy.epsilon", "number"]),
    ({"threads": [1, 2]}, ["threads cannot be swept"]),
    ({"seed": [0, "x"]}, ["seed must be an integer, got 'x'"]),
    ({"cases": {"seed": 1}}, ["cases", "[[cases]]"]),
    ({"cases": [{}]}, ["[[cases]] #1 is empty"]),
    ({"cases": [{"data": {"partitio": "iid"}}]}, ["[[cases]] #1", "data.partitio"]),
    ({"cases": {"a": [{"seed": 1}], "b": [{"seed": 2}]}}, ["[[cases.a]] and [[cases.b]]", "seed"]),
    ({"cases": {"a": [{"seed": 1}], "b": {"seed": 2}}}, ["cases", "[[cases.NAME]]"]),
    ({"sweep": {"outt": "x"}}, ["sweep.outt", "did you mean 'out'"]),
    ({"sweep": {"out": 3}}, ["sweep.out", "folder"]),
    ({"train": {"lr": [0.1, 0.2]}, "data": {"validation_fraction": 0.1},
      "select": {"over": "train.lr", "per": "method.name"}}, ["select.per", "list"]),
    ({"data": {"validation_fraction": 0.1}, "select": {"over": "train.lr"}},
     ["select.over", "train.lr", "one value", "list"]),
    ({"train": {"lr": [0.1, 0.2]}, "select": {"over": "train.lr"}},
     ["data.validation_fraction", "validation split"]),
    ({"train": {"lr": [0.1, 0.2]}, "data": {"validation_fraction": 0.1},
      "select": {"over": "train.lr", "metric": "test_accuracy"}}, ["select.metric", "never the test"]),
    ({"train": {"lr": [0.1, 0.2]}, "data": {"validation_fraction": 0.1},
      "select": {"over": "train.lr", "grid": {"train": {"lr": [0.1]}}}}, ["select.grid", "train.lr"]),
    ({"train": {"lr": [0.1, 0.2]}, "data": {"validation_fraction": 0.1},
      "select": {"over": "train.lr", "per": ["method.nme"]}}, ["method.nme", "method.name"]),
]


@pytest.mark.parametrize("raw,words", BAD_GRIDS)
def test_bad_grids_name_the_key(raw, words):
    with pytest.raises(ConfigError) as err:
        parse_grid(raw)
    for w in words:
        assert w in str(err.value), (w, str(err.value))


def test_bad_grid_on_the_command_line_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.toml").write_text('[privacy]\nepsilon = []\n[sweep]\nout = "out"\n')
    assert main(["sweep", "--config", "grid.toml"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fedlora: error:") and err.count("\n") == 1 and "privacy.epsilon" in err
    assert sorted(os.listdir(tmp_path)) == ["grid.toml"]


def test_data_errors_are_found_before_anything_is_written(tmp_path, tiny_overrides):
    raw = nested(tiny_overrides + ["data.label_column=stars"])
    raw["seed"] = [0, 1]
    with pytest.raises(fedlora.errors.DataError, match="stars"):
        sweep(parse_grid(raw), tmp_path / "out", progress=None)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- running


def test_sweep_skips_complete_runs_and_resumes_an_interrupted_one(tmp_path, tiny_overrides,
                                                                  monkeypatch):
    from fedlora.federation.client import LocalTrainer

    raw = nested(tiny_overrides)
    raw["seed"] = [0, 1]
    grid = parse_grid(raw)
    out = tmp_path / "sweep"
    train, calls = LocalTrainer.train, []

    def crashing(self, client, download, round):  # the second run dies in its second round
        calls.append(round)
        if len(calls) == 3 * 2 + 3 + 1:
            raise KeyboardInterrupt
        return train(self, client, download, round)

    monkeypatch.setattr(LocalTrainer, "train", crashing)
    with pytest.raises(KeyboardInterrupt) as err:
        sweep(grid, out, progress=None)
    assert "fedlora sweep" in " ".join(err.value.__notes__)
    assert (out / "seed=0" / "summary.json").is_file()
    assert (out / "seed=1.partial" / "checkpoint.safetensors").is_file() and not (out / "seed=1").exists()
    first = (out / "seed=0" / "summary.json").read_bytes()

    monkeypatch.setattr(LocalTrainer, "train", train)
    lines: list[str] = []
    result = sweep(grid, out, progress=lines.append)
    assert any("seed=0 · complete, skipped" in x for x in lines)
    assert any("seed=1 · resuming" in x for x in lines)
    assert any("resuming after round 1 of 2" in x for x in lines)
    assert result["runs"] == [str(out / "seed=0"), str(out / "seed=1")]
    assert (out / "seed=0" / "summary.json").read_bytes() == first  # untouched
    # the resumed run equals an uninterrupted one
    ref = fedlora.run(load_config(None, tiny_overrides + ["seed=1"]), tmp_path / "ref", progress=None)
    got = json.loads((out / "seed=1" / "summary.json").read_text())
    for key in ("test_accuracy", "test_loss", "epsilon_per_client", "bytes_uploaded", "steps"):
        assert got[key] == ref[key], key

    lines.clear()  # a third time: nothing left to do
    sweep(grid, out, progress=lines.append)
    assert sum("complete, skipped" in x for x in lines) == 2 and not any("running" in x for x in lines)

    # a folder of the same name but another config is never silently reused
    raw["federation"]["rounds"] = 1
    with pytest.raises(ConfigError, match="another config"):
        sweep(parse_grid(raw), out, progress=None)

    # and the report reads the sweep
    assert main(["report", str(out)]) == 0
    assert (out / "report" / "results.csv").is_file()


def test_selection_chooses_each_methods_rate_on_validation(tmp_path, tiny_overrides):
    raw = nested(tiny_overrides + ["federation.rounds=1", "data.validation_fraction=0.2"])
    raw["seed"] = [0, 1]
    raw["cases"] = [{"method": {"name": "lora"}, "train": {"lr": [0.001, 0.05]}},
                    {"method": {"name": "ffa"}, "train": {"lr": [0.01, 0.2]}}]
    shared = tmp_path / "shared-select"
    raw["select"] = {"over": "train.lr", "per": ["method.name"], "grid": {"seed": [0]},
                     "out": str(shared)}
    out = tmp_path / "sel"
    lines: list[str] = []
    result = sweep(parse_grid(raw), out, progress=lines.append)
    # reference: the validation accuracy read straight from the selection runs' files
    scores = {}
    for folder in shared.iterdir():
        config = load_config(folder / "config.toml")
        assert config.seed == 0  # [select.grid] restricted the selection runs
        last = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        scores[(config.method.name, config.train.lr)] = last["validation_accuracy"]
    assert len(scores) == 4
    chosen = {}
    for method, rates in [("lora", [0.001, 0.05]), ("ffa", [0.01, 0.2])]:
        best = max(rates, key=lambda lr: (scores[(method, lr)], -rates.index(lr)))
        chosen[method] = best
    on_disk = json.loads((out / "selection.json").read_text())
    assert {g["group"]["method.name"]: g["chosen"]["train.lr"] for g in on_disk["groups"]} == chosen
    # final runs: every seed, each method at its chosen rate; seed 0 copied, not re-run
    finals = {}
    for folder in result["runs"]:
        config = load_config(f"{folder}/config.toml")
        finals[(config.method.name, config.seed)] = config.train.lr
    assert finals == {(m, s): chosen[m] for m in chosen for s in (0, 1)}
    assert sum("same config as selection run" in x for x in lines) == 2
    assert (out / "selection.md").read_text().count("**yes**") == 2
    assert lines[0].startswith("sweep ") and "8 runs" in lines[0]
    assert sorted(p.name for p in shared.iterdir()) == [
        "method=ffa,lr=0.01", "method=ffa,lr=0.2", "method=lora,lr=0.001", "method=lora,lr=0.05"]

    # another study sharing the selection folder: its identical selection runs are not redone
    raw["privacy"] = {**raw.get("privacy", {}), "epsilon": [3.0, math.inf]}
    raw["select"]["grid"]["privacy"] = {"epsilon": [3.0]}
    lines.clear()
    again = sweep(parse_grid(raw), tmp_path / "other", progress=lines.append)
    assert sum("complete, skipped" in x for x in lines) == 4
    assert json.loads((tmp_path / "other" / "selection.json").read_text()) == on_disk | {
        "grid": {"seed": [0], "privacy.epsilon": [3.0]}}
    assert len(again["runs"]) == 8

    # --dry-run, the selection complete: the choice is read (not written) and the finals listed
    lines.clear()
    sweep(parse_grid(raw), tmp_path / "third", progress=lines.append, dry_run=True)
    assert not (tmp_path / "third").exists()
    assert [x.split()[0] for x in lines[1:]] == ["complete"] * 4 + ["chosen"] + ["to"] * 8
    assert f"method.name=lora: train.lr={chosen['lora']}" in lines[5]
    lines.clear()
    sweep(parse_grid(raw), tmp_path / "other", progress=lines.append, dry_run=True)
    assert [x.split()[0] for x in lines[1:]] == ["complete"] * 4 + ["chosen"] + ["complete"] * 8
    # --only method.name: that method's selection runs and finals, named as in the whole sweep
    grid = parse_grid(raw)
    parse_only(grid, ["method.name=ffa"])
    lines.clear()
    sweep(grid, tmp_path / "other", progress=lines.append, dry_run=True)
    assert lines[1:] == [x for x in lines_of_whole(raw, tmp_path / "other") if "lora" not in x]
    # an --only sweep's record keeps the choices of complete groups it did not run (lora's)...
    raw["privacy"] = {**raw.get("privacy", {}), "epsilon": [3.0]}
    grid = parse_grid(raw)
    parse_only(grid, ["method.name=ffa"])
    sweep(grid, tmp_path / "other", progress=None)
    assert json.loads((tmp_path / "other" / "selection.json").read_text()) == on_disk | {
        "grid": {"seed": [0], "privacy.epsilon": [3.0]}}
    # ...but never a choice made on an incomplete group
    (shared / "method=lora,lr=0.05").rename(tmp_path / "away")
    grid = parse_grid(raw)
    parse_only(grid, ["method.name=ffa"])
    sweep(grid, tmp_path / "other", progress=None)
    record = json.loads((tmp_path / "other" / "selection.json").read_text())
    assert [g["group"] for g in record["groups"]] == [{"method.name": "ffa"}]
    assert "lora" not in (tmp_path / "other" / "selection.md").read_text()


def lines_of_whole(raw: dict, out) -> list[str]:
    lines: list[str] = []
    sweep(parse_grid(raw), out, progress=lines.append, dry_run=True)
    return [x.replace("method.name=lora: train.lr=0.001; ", "").replace(
        "method.name=lora: train.lr=0.05; ", "") for x in lines[1:]]


def test_only_makes_a_subset_the_whole_sweep_then_finds_complete(tmp_path, tiny_overrides,
                                                                  capsys):
    raw = nested(tiny_overrides + ["federation.rounds=1"])
    raw["seed"] = [0, 1]
    raw["method"] = {"name": ["lora", "ffa"]}
    raw["privacy"] = {**raw.get("privacy", {}), "epsilon": [3.0, math.inf]}
    whole = [r.name for r in parse_grid(raw).runs()]
    grid = parse_grid(raw)
    parse_only(grid, ["seed=1", "privacy.epsilon=inf,3"])  # keys AND, comma values OR
    kept = [r.name for r in grid.kept(grid.runs())]
    assert kept == [n for n in whole if n.endswith("seed=1")] and len(kept) == 4
    for spelling in ("method.name=[lora, ffa]", 'method.name=["lora", "ffa"]',
                     "method.name=lora,ffa"):  # the --only help's example, and its TOML form
        grid = parse_grid(raw)
        parse_only(grid, [spelling, "seed=0"])
        assert grid.only["method.name"] == ["lora", "ffa"], spelling
        assert len(grid.kept(grid.runs())) == 4
    grid = parse_grid(raw)
    parse_only(grid, ["method.name=[ffa]", "privacy.epsilon=[inf]"])  # one bracketed word
    assert grid.only == {"method.name": ["ffa"], "privacy.epsilon": [math.inf]}
    grid = parse_grid(raw)
    parse_only(grid, ["method.name=ffa", "privacy.epsilon=inf"])
    result = sweep(grid, tmp_path / "s", progress=None)
    assert [os.path.basename(f) for f in result["runs"]] == [
        "method=ffa,epsilon=inf,seed=0", "method=ffa,epsilon=inf,seed=1"]
    lines: list[str] = []
    sweep(parse_grid(raw), tmp_path / "s", progress=lines.append)
    assert sum("complete, skipped" in x for x in lines) == 2
    assert sum("running" in x for x in lines) == 6


@pytest.mark.parametrize("only, words", [
    ("sed=1", "unknown key 'sed' — did you mean 'seed'?"),
    ("seed=7", "keeps no run: the grid's seed takes 0, 1 — give one of those"),
    ("train.lr=0.01", "train.lr is what [select] chooses"),
])
def test_a_bad_only_is_refused_before_anything_is_written(tmp_path, capsys, only, words):
    grid = tmp_path / "grid.toml"
    grid.write_text('seed = [0, 1]\n[data]\nvalidation_fraction = 0.1\n'
                    '[train]\nlr = [0.01, 0.1]\n[select]\nover = "train.lr"\n')
    assert main(["sweep", "--config", str(grid), "--out", str(tmp_path / "o"),
                 "--only", only]) == 2
    assert words in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dry_run_lists_runs_and_their_state_and_writes_nothing(tmp_path, tiny_overrides):
    raw = nested(tiny_overrides)
    raw["seed"] = [0, 1]
    raw["method"] = {"name": ["lora", "ffa"]}
    lines: list[str] = []
    sweep(parse_grid(raw), tmp_path / "plain", progress=lines.append, dry_run=True)
    assert lines[1:] == [f"  to run       method={m},seed={s}" for s in (0, 1)
                         for m in ("lora", "ffa")]
    (tmp_path / "plain" / "method=ffa,seed=0.partial").mkdir(parents=True)
    lines.clear()
    sweep(parse_grid(raw), tmp_path / "plain", progress=lines.append, dry_run=True, shard=(1, 2))
    assert "shard 2/2: 2 of them" in lines[0]
    assert lines[1:] == ["  interrupted  method=ffa,seed=0", "  to run       method=ffa,seed=1"]
    # with [select]: the finals depend on the choice, so they wait for the selection runs
    raw["train"]["lr"] = [0.01, 0.1]
    raw["data"]["validation_fraction"] = 0.2
    raw["select"] = {"over": "train.lr", "per": ["method.name"], "grid": {"seed": [0]}}
    lines.clear()
    sweep(parse_grid(raw), tmp_path / "sel", progress=lines.append, dry_run=True)
    assert [x.split()[0] for x in lines[1:]] == ["to"] * 4 + ["(the"]
    assert not (tmp_path / "sel").exists()


def test_shards_split_a_sweep_and_choose_alike(tmp_path, tiny_overrides, monkeypatch):
    """Two shards sharing one out folder: each run is made by exactly one shard, the second
    shard waits for the first one's selection runs, both choose the same rates, and together
    they leave the folders one unsharded sweep leaves."""
    import threading

    from fedlora.study import sweep as sweep_mod

    raw = nested(tiny_overrides + ["federation.rounds=1", "data.validation_fraction=0.2"])
    raw["seed"] = [0, 1]
    raw["cases"] = [{"method": {"name": "lora"}, "train": {"lr": [0.001, 0.05]}},
                    {"method": {"name": "ffa"}, "train": {"lr": [0.01]}}]
    raw["select"] = {"over": "train.lr", "per": ["method.name"], "grid": {"seed": [0]}}
    grid, out = parse_grid(raw), tmp_path / "out"
    # shard 2 runs first and waits; shard 1 runs while shard 2 sleeps (never two runs at once:
    # fedlora.run is not meant to share a process with another run), then shard 2 wakes
    waiting, go = threading.Event(), threading.Event()

    def sleep(_seconds):
        waiting.set()
        go.wait(timeout=600)

    monkeypatch.setattr(sweep_mod, "_sleep", sleep)
    second: dict = {}
    lines2: list[str] = []
    thread = threading.Thread(target=lambda: second.update(
        sweep(grid, out, progress=lines2.append, shard=(1, 2), poll_s=0)))
    thread.start()
    assert waiting.wait(timeout=600)
    lines1: list[str] = []
    first = sweep(grid, out, progress=lines1.append, shard=(0, 2))
    go.set()
    thread.join(timeout=600)
    assert not thread.is_alive()

    assert any("waiting for the other shards' selection runs: 1 of 3" in x for x in lines2)
    assert not any("waiting" in x for x in lines1)   # shard 2's run was complete by then
    assert first["selection"] == second["selection"]
    ran = [x for x in lines1 + lines2
           if x.startswith("[") and (x.endswith("· running") or "copied" in x)]
    names = [x.split("] ", 1)[1].split(" · ")[0] for x in ran]
    assert len(names) == len(set(names)) == 3 + 4   # 3 selection + 4 final, each made once
    assert len(first["runs"]) == len(second["runs"]) == 2
    # the same folders an unsharded sweep would report
    lines: list[str] = []
    whole = sweep(grid, out, progress=lines.append)
    assert sorted(whole["runs"]) == sorted(first["runs"] + second["runs"])
    assert sum("complete, skipped" in x for x in lines) == 3 + 4
    assert whole["selection"] == first["selection"]


@pytest.mark.parametrize("text", ["0/2", "3/2", "1", "a/b", "1/0"])
def test_a_bad_shard_is_refused_before_anything_is_written(tmp_path, capsys, monkeypatch, text):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "grid.toml").write_text('seed = [0, 1]\n[sweep]\nout = "out"\n')
    assert main(["sweep", "--config", "grid.toml", "--shard", text]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--shard" in err and "I/N" in err
    assert sorted(os.listdir(tmp_path)) == ["grid.toml"]


def test_shard_numbers_are_one_based():
    from fedlora.study.sweep import parse_shard

    assert parse_shard("1/1") == (0, 1) and parse_shard("3/4") == (2, 4)


# ---------------------------------------------------------------------------- choice (pure)


def test_choose_by_mean_over_seeds_ties_to_the_first_nan_last():
    s = Selection("validation_accuracy", ["train.lr"], ["method.name"])
    r = lambda m, lr: {"method.name": m, "train.lr": lr}  # noqa: E731
    results = [("a", r("lora", 0.1), 0.60), ("b", r("lora", 0.1), 0.70),   # mean 0.65
               ("c", r("lora", 0.3), 0.66), ("d", r("lora", 0.3), 0.62),   # mean 0.64
               ("e", r("ffa", 1.0), 0.70), ("f", r("ffa", 2.0), 0.70),     # a tie: the first
               ("g", r("ffa", 3.0), math.nan)]
    choices = {c.group["method.name"]: c for c in sel.choose(s, results)}
    assert choices["lora"].chosen == {"train.lr": 0.1}
    assert choices["lora"].candidates[0].mean == pytest.approx(0.65)
    assert choices["lora"].candidates[0].std == pytest.approx(math.sqrt(0.005))
    assert choices["ffa"].chosen == {"train.lr": 1.0}
    loss = Selection("validation_loss", ["train.lr"], [])
    assert sel.choose(loss, [("a", r("x", 1), 0.5), ("b", r("x", 2), 0.4)])[0].chosen == {"train.lr": 2}


def test_an_override_of_a_key_the_cases_set_is_refused(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('[[cases]]\nmethod.name = "lora"\n[[cases]]\nmethod.name = "ffa"\n')
    with pytest.raises(ConfigError, match="method.name is also set by the \\[\\[cases\\]\\]"):
        load_grid(path, ["method.name=fedex"])
    assert len(load_grid(path, ["seed=[0, 1]"]).runs()) == 4


def test_grid_file_and_overrides(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('seed = [0, 1]\n[method]\nname = ["lora", "ffa"]\n[sweep]\nout = "runs/x"\n')
    grid = load_grid(path, ["privacy.epsilon=[1, 3]", "threads=1"])
    assert len(grid.runs()) == 8 and grid.out == "runs/x"
    assert all(r.config.threads == 1 for r in grid.runs())


# ---------------------------------------------------------------------------- the study configs

STUDIES = {"privacy": (24, 96), "alpha": (0, 30), "heterogeneity": (6, 24), "communication": (21, 21),
           "optimizers": (23, 36)}
OWN_SELECTION = {"optimizers"}  # chooses rates study 1 never chose (new optimisers, galore, full)


@pytest.mark.parametrize("study", sorted(STUDIES))
def test_study_configs_are_headed_by_their_command_and_expand_as_documented(study):
    from pathlib import Path

    from fedlora.study.grid import identity
    from fedlora.study.sweep import final_count

    path = Path(__file__).parent.parent / "configs" / "study" / f"{study}.toml"
    assert path.read_text().startswith(f"# fedlora sweep --config configs/study/{study}.toml "
                                       f"&& fedlora report runs/study/{study}\n")
    grid = load_grid(path)
    selection = grid.selection_runs() if grid.select else []
    final = final_count(grid, grid.runs()) if grid.select else len(grid.runs())
    assert (len(selection), final) == STUDIES[study]
    assert grid.out == f"runs/study/{study}"
    if grid.select:  # the studies share study 1's selection runs: same names, same configs
        privacy = load_grid(path.parent / "privacy.toml")
        shared = {(r.name, identity(r.config)) for r in privacy.selection_runs()}
        if study not in OWN_SELECTION:
            assert {(r.name, identity(r.config)) for r in selection} <= shared
        names = {name for name, _ in shared}  # a name in the shared folder means one config
        assert {(r.name, identity(r.config)) for r in selection if r.name in names} <= shared
        assert all(r.config.seed == 0 and r.config.privacy.epsilon == 3 for r in selection)


def test_the_study_on_your_own_csv_from_the_command_line(tmp_path, tiny_overrides, capsys):
    """The README's recipe: a study config, the data keys overridden, an out folder of one's own."""
    from pathlib import Path

    config = Path(__file__).parent.parent / "configs" / "study" / "privacy.toml"
    out = tmp_path / "mine" / "privacy"
    argv = ["sweep", "--config", str(config), "--out", str(out), *tiny_overrides, "seed=[0]",
            "privacy.epsilon=[3.0]"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "note: the selection runs keep seed = [0]" in printed
    assert len(list((tmp_path / "mine" / "select").iterdir())) == 24  # 8 methods × 3 rates
    finals = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert len(finals) == 8 and all(load_config(out / f / "config.toml").data.path.endswith(".csv")
                                    for f in finals)
    assert printed.count("copied") >= 8
    assert main(["report", str(out)]) == 0
    md = (out / "report" / "report.md").read_text()
    assert "## Hyperparameters chosen on the validation split" in md
    assert md.count("**yes**") == 8
