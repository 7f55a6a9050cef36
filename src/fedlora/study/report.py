"""`fedlora report DIR...`: complete run folders → tables (CSV, Markdown) and plots (PNG).

Written to OUT (default `DIR/report/` for one DIR):

    results.csv / results.md       one row per setting, mean ± std over seeds
    curves.csv                     test accuracy after every round, mean ± std over seeds
    communication.csv              bytes (up + down) each setting needed to reach each target accuracy
    paired.csv                     each method − lora, seed by seed (when the method varies)
    accuracy_per_round.png         test accuracy per round, band ± std over seeds
    accuracy_vs_<key>.png          final accuracy against each varied number (ε, α, lr, ...)
    accuracy_by_split.png          final accuracy per data split (when the split varies)
    accuracy_vs_bytes.png          accuracy against bytes sent so far
    report.md                      all of it, with the learning rates chosen (if the sweep chose)

Everything is computed and drawn in memory first; files are written only when all of it worked.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Callable, Sequence

from fedlora.fsutil import atomic_write_bytes
from fedlora.study import paired, plots
from fedlora.study.runs import ReportError, find_runs
from fedlora.study.table import (SPLIT, Table, as_targets, communication_csv,
                                 communication_markdown, curves_csv, curves_markdown,
                                 default_target, group, name, show, to_csv, to_markdown,
                                 value_order)


def _values(table: Table, key: str) -> list[str]:
    """A factor's values in their natural order (ε: 1, 3, 6, ∞), each once."""
    rows = sorted(table.rows, key=lambda r: value_order(key, r.setting[key], r.runs[0].flat))
    return list(dict.fromkeys(show(r.setting[key]) for r in rows))


def describe(table: Table) -> tuple[str, str]:
    """(what varied, on what), (the fixed setup): the two title lines of every figure."""
    f = table.fixed
    varied = " × ".join(f"{name(k)} ∈ {{{', '.join(_values(table, k))}}}" for k in table.factors)
    varied += "".join(f", {name(k)} per setting (in the table)"
                      for k in table.keys if k not in table.factors)
    what = " ".join(x for x in [f.get("method.name"), varied] if x)
    model = Path(str(f.get("model.path", "various models"))).name
    data = Path(str(f.get("data.path", "various data"))).name
    line1 = f"{what} — {model} on {data}"
    parts = []
    if "federation.clients" in f:
        parts.append(f"{f['federation.clients']} clients")
    if SPLIT in f:
        parts.append(f[SPLIT])
    if "federation.rounds" in f and "federation.local_steps" in f:
        parts.append(f"{f['federation.rounds']} rounds × {f['federation.local_steps']} local steps")
    if "privacy.epsilon" in f:
        eps = f["privacy.epsilon"]
        parts.append("no DP" if math.isinf(eps) else f"DP ε = {eps:g}, δ = {f['privacy.delta']:g}")
    if "method.rank" in f and "method.alpha" in f:
        parts.append(f"r = {f['method.rank']}, α = {f['method.alpha']:g}")
    if "train.lr" in f:
        parts.append(f"lr {f['train.lr']:g} ({f.get('train.optimizer', '')})")
    n = len(table.seeds)
    parts.append(f"{n} seed{'s' if n != 1 else ''}")
    return line1, " · ".join(parts)


def build(dirs: list[str | Path], target: float | Sequence[float] | None = None
          ) -> dict[str, bytes | str]:
    """Every output file's content, by file name. `target`: the test accuracy (or accuracies)
    for the bytes-to-target table; None picks the highest every setting's mean curve reaches."""
    runs = find_runs(dirs)
    table = group(runs)
    line1, line2 = describe(table)
    title = f"{line1}\n{line2}"
    figures = {"accuracy_per_round.png": plots.accuracy_per_round(table, title)}
    for key in table.factors:
        values = [row.setting[key] for row in table.rows]
        if key != SPLIT and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                for v in values):
            short = "epsilon" if key == "privacy.epsilon" else key.rpartition(".")[2]
            figures[f"accuracy_vs_{short}.png"] = plots.accuracy_versus(table, key, title)
    if table.has(SPLIT):
        figures["accuracy_by_split.png"] = plots.accuracy_by_split(table, title)
    auto = target is None
    targets = (default_target(table),) if auto else as_targets(target)
    figures["accuracy_vs_bytes.png"] = plots.accuracy_versus_bytes(table, title, targets)
    files: dict[str, bytes | str] = {name: _png(fig) for name, fig in figures.items()}
    files["results.csv"] = to_csv(table)
    files["results.md"] = to_markdown(table)
    files["curves.csv"] = curves_csv(table)
    files["communication.csv"] = communication_csv(table, targets)
    found = paired.pairs(table)
    if found:
        files["paired.csv"] = paired.to_csv(found)
    files["report.md"] = _markdown(table, line1, line2, dirs, targets, auto, list(figures), len(runs))
    return files


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _markdown(table: Table, line1: str, line2: str, dirs, targets: tuple[float, ...], auto: bool,
              figures: list[str], n: int) -> str:
    src = ", ".join(f"`{d}`" for d in dirs)
    hours = sum(float(r.summary.get("wall_seconds") or 0) for row in table.rows for r in row.runs) / 3600
    out = [f"# {line1}", "", line2, "",
           f"{n} complete run folders from {src}, {hours:.1f} hours of run time in all (the sum of "
           "their wall times). One row per setting: mean ± sample standard deviation (n − 1) over "
           f"its seeds ({', '.join(map(str, table.seeds))}); test accuracy is on the held-out test "
           "set after the last round; ε is the largest any client spent." + _subset_note(table),
           "", to_markdown(table),
           "## Per round", "", "Test accuracy after each round, mean over the seeds (the curves "
           "of `accuracy_per_round.png`; `curves.csv` has the std and the MB sent by then).", "",
           curves_markdown(table)]
    for d in map(Path, dirs):
        if (d / "selection.md").is_file():
            out += ["## Hyperparameters chosen on the validation split", "",
                    (d / "selection.md").read_text(encoding="utf-8")]
    rule = (" (the highest accuracy every setting's mean curve reaches; `--target` sets others)"
            if auto else "")
    shown = ", ".join(f"{t:.3f}" for t in targets)
    several = len(targets) > 1
    out += [f"## Communication: MB sent to first reach test accuracy ≥ {shown}", "",
            f"Target{'s' if several else ''} {shown}{rule}. Uploads plus downloads of all "
            "clients, counted from the serialised payloads, up to the first evaluated round at or "
            "above the target; mean ± std over the runs that reached it.", "",
            communication_markdown(table, targets)]
    found = paired.pairs(table)
    if found:
        out += [f"## Paired by seed: each method against {found[0].baseline}", "",
                "Runs with the same seed share the client split, the A matrices, the head's "
                "initialisation and the batch order, so the difference of two methods' final "
                "test accuracies, seed by seed, is free of most of the seed-to-seed spread. "
                "Paired t = mean / (std / √n) on n − 1 degrees of freedom; the last column is the "
                "|t| a 5% two-sided test needs with that many seeds.", "", paired.to_markdown(found)]
    out += ["## Plots", ""]
    out += [f"![{f[:-4].replace('_', ' ')}]({f})" for f in figures]
    return "\n".join(out) + "\n"


def _subset_note(table: Table) -> str:
    """Says so when the curves' rounds before the last were scored on a subset of the test set."""
    sizes = sorted({rec["test_examples"] for row in table.rows for run in row.runs
                    for rec in run.metrics if rec.get("test_examples") is not None})
    if not sizes:
        return ""
    return (f" Per-round points before the last round (curves, MB to target) are on a fixed "
            f"stratified subset of {', '.join(map(str, sizes))} test examples "
            "(`federation.eval_examples`); the last round's, and every final number, are on the "
            "whole test set.")


def parse_targets(given: list[str] | None) -> list[float] | None:
    """`--target 0.7,0.72 --target 0.68` → [0.7, 0.72, 0.68]; None when not given."""
    if not given:
        return None
    out = []
    for part in (p.strip() for text in given for p in text.split(",")):
        try:
            out.append(float(part))
        except ValueError:
            raise ReportError(f"--target: {part!r} is not a number; give accuracies in (0, 1], "
                              "e.g. --target 0.7 or --target 0.68,0.7,0.72") from None
    return out


def write_report(dirs: list[str | Path], out: str | Path | None = None,
                 target: float | Sequence[float] | None = None,
                 progress: Callable[[str], None] | None = print) -> Path:
    """Build everything, then write it to `out`; returns `out`. `target`: one test accuracy or
    several for the bytes-to-target table (None: the highest every setting reaches)."""
    say = progress or (lambda _: None)
    if out is None:
        if len(dirs) != 1:
            raise ReportError("several folders given — say where the report goes with --out DIR")
        out = Path(dirs[0]) / "report"
    if target is not None:
        targets = as_targets(target)
        bad = [t for t in targets if not 0 < t <= 1]  # also catches NaN
        if bad or not targets:
            raise ReportError(f"--target must be one or more accuracies in (0, 1], e.g. "
                              f"--target 0.7 or --target 0.68,0.7,0.72; got {bad or 'none'}")
    files = build(dirs, target)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name_, content in files.items():
        atomic_write_bytes(out / name_, content.encode("utf-8") if isinstance(content, str) else content)
    say(files["results.md"].rstrip())
    say(f"report: {out}/ ({', '.join(sorted(files))})")
    return out
