"""`fedlora report` on synthetic run folders whose numbers are known: means and standard
deviations computed by hand, bytes to a target accuracy, the figures' contents and files."""

from __future__ import annotations

import csv
import io
import json
import math
import struct
from pathlib import Path

import pytest

from fedlora.cli import main
from fedlora.config import config_to_toml, load_config
from fedlora.study import paired, plots
from fedlora.study.report import build, describe, write_report
from fedlora.study.runs import ReportError, find_runs
from fedlora.study.table import (SPLIT, bytes_to_target, communication_csv,
                                 communication_markdown, default_target, group)

# (method, ε) → per seed: test accuracy after rounds 1, 2, 3 (the last is the final accuracy)
CURVES = {
    ("lora", 3.0): {0: [0.50, 0.50, 0.50], 1: [0.55, 0.60, 0.60], 2: [0.65, 0.70, 0.70]},
    ("ffa", 3.0): {0: [0.62, 0.62, 0.62], 1: [0.64, 0.64, 0.64], 2: [0.66, 0.66, 0.66]},
    ("lora", math.inf): {0: [0.70, 0.80, 0.80], 1: [0.70, 0.80, 0.80], 2: [0.70, 0.80, 0.83]},
    ("ffa", math.inf): {0: [0.70, 0.75, 0.78], 1: [0.70, 0.72, 0.74]},
}
BYTES = {"lora": (100, 50), "ffa": (50, 50)}   # per round: uploaded, downloaded


def write_run(folder: Path, overrides: list[str], accuracies: list[float], up: int = 100,
              down: int = 50, validation: float | None = None) -> Path:
    """A run folder as `fedlora run` writes it (config.toml, metrics.jsonl, summary.json)."""
    config = load_config(None, overrides)
    folder.mkdir(parents=True)
    (folder / "config.toml").write_text(config_to_toml(config))
    eps = "inf" if math.isinf(config.privacy.epsilon) else config.privacy.epsilon
    records = [{"round": r + 1, "test_accuracy": a, "test_loss": 0.7, "epsilon": eps,
                "bytes_uploaded": up, "bytes_downloaded": down, "seconds": 1.0,
                **({"validation_accuracy": validation} if validation is not None else {})}
               for r, a in enumerate(accuracies)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in records))
    summary = {"method": config.method.name, "test_accuracy": accuracies[-1],
               "validation_accuracy": validation, "majority_accuracy": 0.5, "epsilon": eps,
               "bytes_uploaded": up * len(accuracies), "bytes_downloaded": down * len(accuracies),
               "wall_seconds": 120.0, "rounds": len(accuracies)}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


@pytest.fixture
def study(tmp_path) -> Path:
    out = tmp_path / "study"
    for (method, eps), seeds in CURVES.items():
        for seed, accs in seeds.items():
            up, down = BYTES[method]
            write_run(out / f"{method}-{eps}-{seed}",
                      [f"method.name={method}", f"privacy.epsilon={eps}", f"seed={seed}"],
                      accs, up, down)
    (out / "ffa-3.0-9.partial").mkdir()  # an unfinished run is never counted
    return out


def rows_by(table, key=lambda s: (s["method.name"], s["privacy.epsilon"])):
    return {key(r.setting): r for r in table.rows}


def test_mean_and_std_over_seeds_by_hand(study):
    table = group(find_runs([study]))
    assert table.keys == ["method.name", "privacy.epsilon"] and table.seeds == [0, 1, 2]
    rows = rows_by(table)
    acc = lambda r: r.summary["test_accuracy"]  # noqa: E731
    # hand-computed: mean, and sqrt(Σ(x − mean)² / (n − 1))
    expected = {("lora", 3.0): (0.60, 0.10), ("ffa", 3.0): (0.64, 0.02),
                ("lora", math.inf): (0.81, math.sqrt(0.0006 / 2)),
                ("ffa", math.inf): (0.76, math.sqrt(0.0008 / 1))}
    for setting, (mean, std) in expected.items():
        m, s = rows[setting].stat(acc)
        assert (m, s) == (pytest.approx(mean), pytest.approx(std)), setting
    assert len(rows[("ffa", math.inf)].runs) == 2
    # rows in order: method, then ε ascending with ∞ last
    assert [tuple(r.setting.values()) for r in table.rows] == [
        ("ffa", 3.0), ("ffa", math.inf), ("lora", 3.0), ("lora", math.inf)]


def test_csv_and_markdown_carry_the_same_numbers(study):
    files = build([study], target=0.6)
    rows = {(r["method.name"], r["privacy.epsilon"]): r
            for r in csv.DictReader(io.StringIO(files["results.csv"]))}
    lora = rows[("lora", "3")]
    assert int(lora["runs"]) == 3
    assert float(lora["test_accuracy_mean"]) == pytest.approx(0.6)
    assert float(lora["test_accuracy_std"]) == pytest.approx(0.1)
    assert float(lora["bytes_uploaded_mean"]) == 300 and float(lora["epsilon_spent_mean"]) == 3
    assert float(rows[("ffa", "∞")]["test_accuracy_std"]) == pytest.approx(math.sqrt(0.0008))
    assert rows[("ffa", "∞")]["epsilon_spent_mean"] == "inf"
    assert rows[("ffa", "∞")]["validation_accuracy_mean"] == ""  # not measured: empty, not 0
    md = files["results.md"]
    assert "| lora | 3 | 3 | 0.600 ± 0.100 | 3.00 |" in md
    assert "| ffa | ∞ | 2 | 0.760 ± 0.028 | ∞ (no DP) |" in md
    assert "validation accuracy" not in md


def test_bytes_to_reach_a_target_by_hand(study):
    table = group(find_runs([study]))
    rows = rows_by(table)
    # lora, ε=3, target 0.6: seed 0 never; seed 1 at round 2 (2 × 150 B); seed 2 at round 1 (150 B)
    reached, n = bytes_to_target(rows[("lora", 3.0)], 0.6)
    assert (sorted(reached), n) == ([150.0, 300.0], 3)
    assert bytes_to_target(rows[("ffa", 3.0)], 0.6) == ([100.0] * 3, 3)
    comm = {(r["method.name"], r["privacy.epsilon"]): r
            for r in csv.DictReader(io.StringIO(build([study], target=0.6)["communication.csv"]))}
    assert comm[("lora", "3")]["runs_reached"] == "2"
    assert float(comm[("lora", "3")]["bytes_to_target_mean"]) == 225
    assert float(comm[("lora", "3")]["bytes_to_target_std"]) == pytest.approx(math.sqrt(2 * 75 ** 2))
    assert float(comm[("lora", "3")]["rounds_to_target_mean"]) == 1.5
    # default target: the highest accuracy every setting's mean curve reaches — lora at ε=3
    # peaks at mean(0.5, 0.6, 0.7) = 0.6, below every other setting's peak
    assert default_target(table) == pytest.approx(0.6)


def test_per_round_numbers_by_hand(study):
    """curves.csv and report.md's per-round table: the mean and sample std over seeds after each
    round, and the MB sent by then, computed by hand from CURVES and BYTES."""
    files = build([study])
    rows = {(r["method.name"], r["privacy.epsilon"], r["round"]): r
            for r in csv.DictReader(io.StringIO(files["curves.csv"]))}
    assert len(rows) == 4 * 3
    first = rows[("lora", "3", "1")]                       # 0.50, 0.55, 0.65
    assert int(first["runs"]) == 3
    assert float(first["test_accuracy_mean"]) == pytest.approx(1.7 / 3)
    assert float(first["test_accuracy_std"]) == pytest.approx(
        math.sqrt(sum((x - 1.7 / 3) ** 2 for x in (0.50, 0.55, 0.65)) / 2))
    assert float(rows[("lora", "3", "2")]["mb_sent_mean"]) == pytest.approx(2 * 150 / 1e6)
    assert rows[("ffa", "∞", "3")]["runs"] == "2"            # two seeds only
    assert float(rows[("ffa", "∞", "3")]["test_accuracy_mean"]) == pytest.approx(0.76)
    assert rows[("lora", "3", "1")]["test_subset"] == "false"
    md = files["report.md"]
    assert "| method | ε | runs | test accuracy after rounds 1, 2, 3 (mean over seeds) |" in md
    assert "| lora | 3 | 3 | 0.567, 0.600, 0.600 |" in md
    assert "| ffa | ∞ | 2 | 0.700, 0.735, 0.760 |" in md


def test_several_targets_give_the_one_target_figures_for_each(study, tmp_path, capsys):
    """--target 0.6,0.65 (or --target repeated): communication.csv in long form, one row per
    target and setting, each with the figures one target alone gives; one table and one dashed
    line per target."""
    files = build([study], target=[0.6, 0.65])
    comm = {(r["target_accuracy"], r["method.name"], r["privacy.epsilon"]): r
            for r in csv.DictReader(io.StringIO(files["communication.csv"]))}
    assert len(comm) == 2 * 4
    assert comm[("0.6", "lora", "3")]["runs_reached"] == "2"
    assert float(comm[("0.6", "lora", "3")]["bytes_to_target_mean"]) == 225
    # 0.65 by hand: lora only seed 2 (0.65 at round 1: 150 B); ffa only seed 2 (0.66: 100 B)
    assert comm[("0.65", "lora", "3")]["runs_reached"] == "1"
    assert float(comm[("0.65", "lora", "3")]["bytes_to_target_mean"]) == 150
    assert float(comm[("0.65", "ffa", "3")]["bytes_to_target_mean"]) == 100
    assert build([study], target=[0.6, 0.65, 0.6])["communication.csv"] == files["communication.csv"]
    alone = build([study], target=0.65)["communication.csv"].splitlines()
    assert set(alone[1:]) < set(files["communication.csv"].splitlines())
    md = files["report.md"]
    assert "test accuracy ≥ 0.600, 0.650" in md
    assert "| target test accuracy | method | ε | runs reaching it |" in md
    assert "| 0.650 | lora | 3 | 1/3 | 0.00 ± – | 1.0 |" in md
    assert "| 0.600 | lora | 3 | 2/3 | 0.00 ± 0.00 | 1.5 |" in md
    fig = plots.accuracy_versus_bytes(group(find_runs([study])), "t", [0.6, 0.65])
    dashed = [ln for ln in fig.axes[0].get_lines() if ln.get_linestyle() == "--"]
    assert sorted(ln.get_ydata()[0] for ln in dashed) == [0.6, 0.65]
    assert "target accuracy 0.600, 0.650" in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    # the command line: comma-separated and repeated are the same
    assert main(["report", str(study), "--out", str(tmp_path / "a"), "--target", "0.6,0.65"]) == 0
    assert main(["report", str(study), "--out", str(tmp_path / "b"),
                 "--target", "0.6", "--target", "0.65"]) == 0
    for out in ("a", "b"):
        assert (tmp_path / out / "communication.csv").read_text() == files["communication.csv"]


@pytest.mark.parametrize("given, problem", [("0.6,abc", "'abc' is not a number"),
                                            ("0.6,1.5", "in (0, 1]"), ("nan", "in (0, 1]"),
                                            ("0.6,", "'' is not a number")])
def test_a_bad_target_is_refused_and_nothing_is_written(study, tmp_path, capsys, given, problem):
    assert main(["report", str(study), "--out", str(tmp_path / "rep"), "--target", given]) == 2
    err = capsys.readouterr().err
    assert problem in err and "--target" in err and err.count("\n") == 1
    assert not (tmp_path / "rep").exists()


def test_figures_show_the_numbers_with_labels(study):
    table = group(find_runs([study]))
    title = "\n".join(describe(table))
    assert "method ∈ {ffa, lora} × ε ∈ {3, ∞}" in title and "3 seeds" in title
    fig = plots.accuracy_versus(table, "privacy.epsilon", title)
    ax = fig.axes[0]
    assert ax.get_xlabel().startswith("privacy budget ε") and "δ = 1e-05" in ax.get_xlabel()
    assert ax.get_ylabel() == plots.ACCURACY and ax.get_title() and fig._suptitle.get_text() == title
    assert [t.get_text() for t in ax.get_xticklabels()] == ["3", "∞\n(no DP)"]
    assert "over 2–3 seeds per setting" in ax.get_title()  # ffa at ε = ∞ has 2 seeds, the rest 3
    lines = {c.get_label(): c.lines[0].get_ydata() for c in ax.containers}
    assert list(lines["ffa"]) == pytest.approx([0.64, 0.76])
    assert list(lines["lora"]) == pytest.approx([0.60, 0.81])
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"ffa", "lora", "always the majority class"} <= set(legend)

    fig = plots.accuracy_per_round(table, title)
    assert [a.get_title() for a in fig.axes] == ["ε = 3", "ε = ∞"]
    assert all(a.get_xlabel() == "round" for a in fig.axes) and fig.axes[0].get_ylabel()
    lora3 = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "lora"][0]
    assert list(lora3.get_xdata()) == [1, 2, 3]
    assert list(lora3.get_ydata()) == pytest.approx([(0.5 + 0.55 + 0.65) / 3, 0.6, 0.6])
    assert len(fig.axes[0].collections) == 2  # a band over seeds per line
    # a method run at ε = ∞ only is named in the one legend, on the ε = 3 panel
    write_run(study / "fair-inf", ["method.name=fair", "privacy.epsilon=inf", "seed=0"], [0.7])
    fig = plots.accuracy_per_round(group(find_runs([study])), title)
    assert "fair" not in [ln.get_label() for ln in fig.axes[0].get_lines()]
    assert {"fair", "ffa", "lora"} <= {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
    assert not any(ln.get_label() == "_subset" for a in fig.axes for ln in a.get_lines())
    assert plots.SUBSET not in [t.get_text() for t in fig.axes[0].get_legend().get_texts()]

    fig = plots.accuracy_versus_bytes(table, title, 0.6)
    ffa3 = [ln for ln in fig.axes[0].get_lines() if ln.get_label() == "ffa · ε=3"][0]
    assert list(ffa3.get_xdata()) == pytest.approx([1e-4, 2e-4, 3e-4])  # MB so far, up + down


def test_log_axis_minor_labels_do_not_collide():
    """Within a decade every minor tick is labelled; across 2 decades only 2× and 5×; across
    3 or more none (0.8, 0.9 and 1 were printed on top of each other)."""
    def labels(lo, hi, ticks):
        return [plots._minor_label(lo, hi)(x, None) for x in ticks]
    assert labels(2, 9, [3, 4, 0.6]) == ["3", "4", "0.6"]
    assert labels(0.9, 50, [0.2, 0.3, 0.5, 2, 8, 9, 20, 50]) == ["0.2", "", "0.5", "2", "", "", "20", "50"]
    assert labels(0.9, 1000, [2, 5, 20]) == ["", "", ""]


def test_a_long_title_is_wrapped_to_the_figure():
    line1 = "method ∈ {" + ", ".join(f"m{i}" for i in range(40)) + "} — model on data"
    fig, _ = plots.figure(line1 + "\nsetup")
    lines = fig._suptitle.get_text().split("\n")
    assert len(lines) > 2 and lines[-1] == "setup"
    assert " ".join(lines[:-1]) == line1 and max(map(len, lines)) <= int(plots.SIZE[0] * 13)
    # a model's name is never cut at its hyphens ("all-" / "MiniLM-L6-v2")
    fig, _ = plots.figure("x " * 49 + "all-MiniLM-L6-v2 on rotten_tomatoes\nsetup")
    assert "all-MiniLM-L6-v2" in fig._suptitle.get_text().split("\n")[1]


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_report_files_are_written(study, tmp_path, capsys):
    assert main(["report", str(study), "--out", str(tmp_path / "rep"), "--target", "0.6"]) == 0
    out = tmp_path / "rep"
    assert {p.name for p in out.iterdir()} == {
        "results.csv", "results.md", "curves.csv", "communication.csv", "paired.csv", "report.md",
        "accuracy_per_round.png", "accuracy_vs_epsilon.png", "accuracy_vs_bytes.png"}
    w, h = plots.SIZE
    assert png_size(out / "accuracy_vs_epsilon.png") == (int(w * plots.DPI), int(h * plots.DPI))
    assert png_size(out / "accuracy_per_round.png")[0] > png_size(out / "accuracy_vs_bytes.png")[0]
    md = (out / "report.md").read_text()
    assert md.startswith("# method ∈ {ffa, lora} × ε ∈ {3, ∞}")
    assert "11 complete run folders" in md and "0.4 hours of run time" in md  # 11 × 120 s
    assert "![accuracy vs epsilon](accuracy_vs_epsilon.png)" in md
    assert "test accuracy ≥ 0.600" in md and "| lora | 3 | 2/3 | 0.00 ± 0.00 | 1.5 |" in md
    assert "0.600 ± 0.100" in capsys.readouterr().out
    assert "subset" not in md  # every round of these runs was scored on the whole test set


def test_report_says_when_curves_are_on_a_test_subset(study, tmp_path):
    """Runs with federation.eval_examples: rounds before the last carry `test_examples`; the
    curve keeps every round, and the report says which points are on a subset."""
    for metrics in study.glob("*/metrics.jsonl"):
        records = [json.loads(x) for x in metrics.read_text().splitlines()]
        for r in records[:-1]:
            r["test_examples"] = 512
        metrics.write_text("".join(json.dumps(x) + "\n" for x in records))
    table = group(find_runs([study]))
    assert [c[1] for c in rows_by(table)[("lora", 3.0)].mean_curve()] == \
        [pytest.approx(x) for x in (0.5666667, 0.6, 0.6)]  # hand: the seeds' means per round
    md = (write_report([study], tmp_path / "rep", progress=None) / "report.md").read_text()
    assert "fixed stratified subset of 512 test examples" in md
    assert "| lora | 3 | 3 | ≈0.567, ≈0.600, 0.600 |" in md      # the per-round table marks them
    # the curves draw the subset rounds hollow, the whole-set last round filled
    ax = plots.accuracy_per_round(table, "t").axes[0]   # the ε = 3 panel
    lora = [ln for ln in ax.get_lines() if ln.get_label() == "lora"][0]
    hollow = [ln for ln in ax.get_lines() if ln.get_label() == "_subset"
              and ln.get_markeredgecolor() == lora.get_color()][0]
    assert list(hollow.get_xdata()) == [1, 2] and hollow.get_markerfacecolor() == "white"
    assert list(hollow.get_ydata()) == pytest.approx([0.5666667, 0.6])
    assert plots.SUBSET in [t.get_text() for t in ax.get_legend().get_texts()]


def test_data_split_and_alpha_figures(tmp_path):
    base = ["method.name=ffa"]
    splits = [("iid", 0.5, 0.80), ("dirichlet", 1.0, 0.75), ("dirichlet", 0.1, 0.60),
              ("group", 0.5, 0.70)]
    for partition, alpha, acc in splits:
        write_run(tmp_path / "s" / f"{partition}{alpha}",
                  base + [f"data.partition={partition}", f"data.dirichlet_alpha={alpha}"], [acc])
    table = group(find_runs([tmp_path / "s"]))
    assert table.keys == [SPLIT]
    assert [r.setting[SPLIT] for r in table.rows] == [
        "IID", "Dirichlet(1)", "Dirichlet(0.1)", "by movie_name"]
    files = build([tmp_path / "s"])
    assert "accuracy_by_split.png" in files and "accuracy_vs_dirichlet_alpha.png" not in files
    fig = plots.accuracy_by_split(table, "t")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == [r.setting[SPLIT] for r in table.rows]
    assert [p.get_height() for p in ax.patches] == pytest.approx([0.80, 0.75, 0.60, 0.70])

    for alpha, acc in [(1, 0.6), (16, 0.7), (256, 0.65)]:
        write_run(tmp_path / "a" / f"a{alpha}", base + [f"method.alpha={alpha}"], [acc])
    table = group(find_runs([tmp_path / "a"]))
    fig = plots.accuracy_versus(table, "method.alpha", "t")
    assert fig.axes[0].get_xscale() == "log" and "α/r" in fig.axes[0].get_xlabel()


def test_report_refuses_what_it_cannot_read(tmp_path, study):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ReportError, match="no complete run folders"):
        find_runs([empty])
    with pytest.raises(ReportError, match="unfinished run"):
        find_runs([study / "ffa-3.0-9.partial"])
    twin = tmp_path / "twin"
    write_run(twin / "x", ["method.name=lora", "privacy.epsilon=3", "seed=0"], [0.5])
    with pytest.raises(ReportError, match="same setting with the same seed"):
        group(find_runs([study, twin]))
    with pytest.raises(ReportError, match="--out"):
        write_report([study, twin])
    assert not (study / "report").exists()


def test_a_key_set_per_method_is_a_column_not_a_factor(tmp_path):
    """Learning rates chosen per method vary, but are not crossed with anything: no plot
    against them, no '× lr ∈ {…}' in the title, no lr in the legend."""
    for method, lr in [("lora", 0.001), ("ffa", 0.01)]:
        for eps in (3.0, math.inf):
            write_run(tmp_path / "r" / f"{method}{eps}",
                      [f"method.name={method}", f"train.lr={lr}", f"privacy.epsilon={eps}"], [0.6])
    table = group(find_runs([tmp_path / "r"]))
    assert table.keys == ["method.name", "train.lr", "privacy.epsilon"]
    assert table.factors == ["method.name", "privacy.epsilon"]
    files = build([tmp_path / "r"])
    assert "accuracy_vs_lr.png" not in files and "accuracy_vs_epsilon.png" in files
    assert "| lora | 0.001 | 3 | 1 |" in files["results.md"]
    line1, _ = describe(table)
    assert line1.startswith("method ∈ {ffa, lora} × ε ∈ {3, ∞}, lr per setting (in the table)")
    fig = plots.accuracy_versus(table, "privacy.epsilon", "t")
    assert sorted(c.get_label() for c in fig.axes[0].containers) == ["ffa", "lora"]


def test_paired_differences_by_hand(study, tmp_path):
    """ffa − lora seed by seed, from CURVES: ε = 3: +0.12, +0.04, −0.04; ε = ∞: seeds 0 and 1
    only (ffa has no seed 2): −0.02, −0.06."""
    found = {p.setting["privacy.epsilon"]: p for p in paired.pairs(group(find_runs([study])))}
    assert set(found) == {3.0, math.inf}
    three, inf = found[3.0], found[math.inf]
    assert (three.method, three.baseline, three.seeds) == ("ffa", "lora", [0, 1, 2])
    assert three.diffs == pytest.approx([0.12, 0.04, -0.04])
    assert three.mean_std == (pytest.approx(0.04), pytest.approx(0.08))  # √((.08² + 0 + .08²)/2)
    assert (three.wins, three.t) == (2, pytest.approx(0.04 / (0.08 / math.sqrt(3))))
    assert inf.seeds == [0, 1] and inf.diffs == pytest.approx([-0.02, -0.06])
    assert inf.mean_std == (pytest.approx(-0.04), pytest.approx(math.sqrt(0.0008)))
    assert inf.wins == 0
    write_report([study], tmp_path / "r", progress=None)
    md = (tmp_path / "r" / "report.md").read_text()
    assert "## Paired by seed: each method against lora" in md
    assert "| 3 | ffa − lora | 0, 1, 2 | +0.120 / +0.040 / -0.040 | +0.040 ± 0.080 | 2 of 3 | 0.87 | 4.30 |" in md
    header = next(line for line in md.splitlines() if "method − baseline" in line)
    assert header.replace(r"\|", "").count("|") == 9  # 8 cells: no bare | inside one
    rows = list(csv.DictReader(io.StringIO((tmp_path / "r" / "paired.csv").read_text())))
    assert len(rows) == 5 and float(rows[0]["test_accuracy_difference"]) == pytest.approx(0.12)


def test_title_lists_values_in_order_whatever_the_rows(tmp_path):
    """A method with only ε = 6 sorts first; the title still reads ε ∈ {1, 6, ∞}."""
    write_run(tmp_path / "s" / "a6", ["method.name=fair", "privacy.epsilon=6"], [0.6])
    for eps in ["inf", "1", "6"]:
        write_run(tmp_path / "s" / f"b{eps}", ["method.name=lora", f"privacy.epsilon={eps}"], [0.6])
    line1, _ = describe(group(find_runs([tmp_path / "s"])))
    assert line1.startswith("method ∈ {fair, lora} × ε ∈ {1, 6, ∞} — ")


def test_t_needed_matches_scipy():
    """The 5% two-sided critical |t| against scipy's Student t; past the table, never below it."""
    stats = pytest.importorskip("scipy.stats")
    for n in range(2, 32):
        assert paired.t_needed(n) == pytest.approx(stats.t.ppf(0.975, n - 1), abs=6e-4)
    assert paired.t_needed(100) >= stats.t.ppf(0.975, 99)
    assert math.isnan(paired.t_needed(1))


def test_no_pairs_without_two_methods(tmp_path):
    for seed, acc in [(0, 0.6), (1, 0.7)]:
        write_run(tmp_path / "s" / f"r{seed}", [f"seed={seed}", "privacy.epsilon=3"], [acc])
        write_run(tmp_path / "s" / f"q{seed}", [f"seed={seed}", "privacy.epsilon=1"], [acc])
    assert paired.pairs(group(find_runs([tmp_path / "s"]))) == []
    assert "paired.csv" not in build([tmp_path / "s"])


def test_pairs_are_listed_in_the_settings_order(tmp_path):
    """fair ran at ε = 3 only and sorts first; the pairs still go ε = 1, 3, ∞."""
    for eps in ["inf", "3", "1"]:
        for method in ["lora", "ffa"]:
            write_run(tmp_path / "s" / f"{method}{eps}", [f"method.name={method}",
                                                          f"privacy.epsilon={eps}"], [0.6])
    write_run(tmp_path / "s" / "fair3", ["method.name=fair", "privacy.epsilon=3"], [0.6])
    found = paired.pairs(group(find_runs([tmp_path / "s"])))
    assert [(p.setting["privacy.epsilon"], p.method) for p in found] == [
        (1.0, "ffa"), (3.0, "fair"), (3.0, "ffa"), (math.inf, "ffa")]


def test_rounds_to_target_is_an_upper_bound_when_rounds_were_not_scored(tmp_path):
    """eval_every = 3: only round 3 is scored, so "reached at round 3" may have happened sooner."""
    for seed in (0, 1):
        folder = write_run(tmp_path / "s" / f"sparse{seed}", ["method.name=ffa", f"seed={seed}"],
                           [0.6, 0.7, 0.7], up=10 ** 6, down=10 ** 6)
        records = [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]
        for rec in records[:2]:
            del rec["test_accuracy"]
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        write_run(tmp_path / "s" / f"dense{seed}", ["method.name=lora", f"seed={seed}"],
                  [0.6, 0.7, 0.7], up=10 ** 6, down=10 ** 6)
    table = group(find_runs([tmp_path / "s"]))
    md = communication_markdown(table, 0.65)
    assert "| ffa | 2/2 | ≤ 6.00 ± 0.00 | ≤ 3.0 |" in md  # 3 rounds × 2 MB, by round 3
    assert "| lora | 2/2 | 4.00 ± 0.00 | 2.0 |" in md and "an upper bound" in md
    rows = {r["method.name"]: r
            for r in csv.DictReader(io.StringIO(communication_csv(table, 0.65)))}
    assert (rows["ffa"]["upper_bound"], rows["lora"]["upper_bound"]) == ("true", "false")
    assert float(rows["ffa"]["bytes_to_target_mean"]) == 6e6
    assert float(rows["lora"]["bytes_to_target_mean"]) == 4e6
    dense = group(find_runs(sorted((tmp_path / "s").glob("dense*"))))
    assert "upper bound" not in communication_markdown(dense, 0.65)
