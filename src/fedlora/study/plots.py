"""The report's figures: matplotlib `Figure` objects (no pyplot, so no global state or display).

Every figure has a title saying what was run, labelled axes with units, and a legend; a point
is the mean over seeds and its bar or band ± one sample standard deviation.
"""

from __future__ import annotations

import math
import textwrap
from typing import Any, Sequence

from matplotlib import colormaps
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter

from fedlora.study.table import (SPLIT, Row, Table, as_targets, label, mean_std, name, show,
                                 split_order)

SIZE = (8.0, 5.0)   # inches; at DPI below, 880 × 550 pixels
DPI = 110
ACCURACY = "test accuracy (fraction of test examples)"
EPSILON = "privacy.epsilon"


def figure(suptitle: str, panels: int = 1) -> tuple[Figure, list]:
    width = SIZE[0] if panels == 1 else min(4.2 * panels, 17.0)
    fig = Figure(figsize=(width, SIZE[1]), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, panels, sharey=True, squeeze=False)[0].tolist()
    chars = int(width * 13)  # ~characters of a 10-pt title line across the figure
    # never at a hyphen: a model's name ("all-MiniLM-L6-v2") stays whole
    lines = (textwrap.fill(line, chars, break_on_hyphens=False) for line in suptitle.split("\n"))
    fig.suptitle("\n".join(lines), fontsize=10)
    return fig, axes


def _colors(labels: list[str]) -> dict[str, Any]:
    cmap = colormaps["tab10" if len(labels) <= 10 else "tab20"]
    return {lab: cmap(i % cmap.N) for i, lab in enumerate(dict.fromkeys(labels))}


def _series(table: Table, without: list[str]) -> tuple[list[str], dict[str, list[Row]]]:
    """Rows grouped into lines: one per value of the varied keys other than `without`."""
    keys = [k for k in table.factors if k not in without]
    lines: dict[str, list[Row]] = {}
    for row in table.rows:
        lines.setdefault(label(row.setting, keys), []).append(row)
    return keys, lines


def _majority(table: Table, ax) -> None:
    values = [r.summary.get("majority_accuracy") for row in table.rows for r in row.runs]
    values = [v for v in values if v is not None]
    if values:
        ax.axhline(sum(values) / len(values), color="grey", linestyle=":", linewidth=1,
                   label="always the majority class")


def _seeds(table: Table) -> str:
    counts = sorted({len(row.runs) for row in table.rows})
    if len(counts) > 1:  # e.g. a study's new settings beside another's 3-seed runs
        return (f"mean ± std over {counts[0]}–{counts[-1]} seeds per setting; "
                "no whisker: one seed")
    n = counts[0]
    return f"mean ± std over {n} seeds" if n > 1 else "one seed (no spread)"


SUBSET = "hollow: a fixed test subset (eval_examples)"


def _hollow_subset_points(ax, row: Row, curve, color) -> None:
    """Rounds scored on the fixed test subset drawn hollow: the subset's offset from the whole
    set is the same in every round, so a step at the last (whole-set) round is not a drop."""
    subset = row.subset_rounds()
    points = [(p.round, p.mean) for p in curve if p.round in subset]
    if points:
        ax.plot([p[0] for p in points], [p[1] for p in points], linestyle="none", marker="o",
                markersize=6, markerfacecolor="white", markeredgecolor=color, label="_subset")


def _subset_legend_entry(table: Table, ax) -> None:
    if any(row.subset_rounds() for row in table.rows):
        ax.plot([], [], linestyle="none", marker="o", markersize=6, markerfacecolor="white",
                markeredgecolor="grey", label=SUBSET)


def _legend_of_all_panels(axes) -> None:
    """One legend, on the first panel, naming every series of every panel: a method run at
    one ε only (say ε = 3) must be named even when the first panel (ε = 1) lacks it."""
    entries: dict[str, Any] = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    axes[0].legend(list(entries.values()), list(entries), fontsize=7, loc="best")


def accuracy_per_round(table: Table, suptitle: str) -> Figure:
    """Test accuracy after each round; one panel per ε when ε varies."""
    panel_key = EPSILON if table.has(EPSILON) else None
    panel_values = sorted({row.setting[panel_key] for row in table.rows}) if panel_key else [None]
    fig, axes = figure(suptitle, len(panel_values))
    _, lines = _series(table, [panel_key] if panel_key else [])
    colors = _colors(list(lines))
    for ax, value in zip(axes, panel_values):
        for lab, rows in lines.items():
            for row in rows:
                if panel_key and row.setting[panel_key] != value:
                    continue
                curve = row.mean_curve()
                x = [p.round for p in curve]
                mean = [p.mean for p in curve]
                ax.plot(x, mean, marker="o", markersize=3, color=colors[lab], label=lab)
                _hollow_subset_points(ax, row, curve, colors[lab])
                if len(row.runs) > 1:
                    lo = [p.mean - (0 if math.isnan(p.std) else p.std) for p in curve]
                    hi = [p.mean + (0 if math.isnan(p.std) else p.std) for p in curve]
                    ax.fill_between(x, lo, hi, color=colors[lab], alpha=0.18, linewidth=0)
        _majority(table, ax)
        ax.set_xlabel("round")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.set_title(f"ε = {show(value)}" if panel_key else f"test accuracy per round ({_seeds(table)})",
                     fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(ACCURACY)
    _subset_legend_entry(table, axes[0])
    _legend_of_all_panels(axes)
    if panel_key:
        fig.supxlabel(f"test accuracy after each round ({_seeds(table)}; band: ± std)", fontsize=9)
    return fig


def accuracy_versus(table: Table, key: str, suptitle: str) -> Figure:
    """Final test accuracy against the values of one varied key, one line per other setting."""
    fig, (ax,) = figure(suptitle)
    _, lines = _series(table, [key])
    colors = _colors(list(lines))
    values = sorted({row.setting[key] for row in table.rows}, key=_sortable)
    categorical = key == EPSILON or not all(isinstance(v, (int, float)) for v in values)
    position = {v: i for i, v in enumerate(values)} if categorical else {v: v for v in values}
    logx = not categorical and min(values) > 0 and max(values) / min(values) >= 10
    for i, (lab, rows) in enumerate(lines.items()):
        rows = sorted(rows, key=lambda r: _sortable(r.setting[key]))
        stats = [mean_std(r.values(lambda run: run.summary.get("test_accuracy"))) for r in rows]
        # a small sideways shift per line, so equal points and their error bars stay visible
        shift = (i - (len(lines) - 1) / 2) * 0.04
        xs = [_dodge(position[r.setting[key]], shift, categorical, logx) for r in rows]
        ax.errorbar(xs, [m for m, _ in stats],
                    yerr=[s for _, s in stats], marker="o", capsize=4,
                    color=colors[lab], label=lab)
    _majority(table, ax)
    if categorical:
        ax.set_xticks(range(len(values)), [_tick(key, v) for v in values])
    elif logx:
        ax.set_xscale("log", base=2 if key == "method.alpha" else 10)
        ax.set_xticks(values, [show(v) for v in values])
        ax.minorticks_off()
    ax.set_xlabel(_axis_label(key, table))
    ax.set_ylabel(ACCURACY)
    ax.set_title(f"final test accuracy against {name(key)} ({_seeds(table)})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return fig


def accuracy_by_split(table: Table, suptitle: str) -> Figure:
    """Final test accuracy per data split (least to most heterogeneous), bars per other setting."""
    fig, (ax,) = figure(suptitle)
    _, lines = _series(table, [SPLIT])
    colors = _colors(list(lines))
    order: dict[str, tuple] = {}
    for row in table.rows:
        order[row.setting[SPLIT]] = split_order(row.runs[0].flat)
    splits = sorted(order, key=order.get)
    width = 0.8 / max(1, len(lines))
    for i, (lab, rows) in enumerate(lines.items()):
        by_split = {r.setting[SPLIT]: r for r in rows}
        xs, means, errs = [], [], []
        for j, split in enumerate(splits):
            if split in by_split:
                m, s = by_split[split].stat(lambda run: run.summary.get("test_accuracy"))
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(m)
                errs.append(s)  # NaN (one seed): no whisker rather than a flat one
        ax.bar(xs, means, width=width * 0.95, yerr=errs, capsize=3, color=colors[lab], label=lab)
    _majority(table, ax)
    ax.set_xticks(range(len(splits)), splits)
    ax.set_xlabel("how the training data is split across clients (more heterogeneous →)")
    ax.set_ylabel(ACCURACY)
    ax.set_title(f"final test accuracy per data split ({_seeds(table)})", fontsize=9)
    lows = [m for row in table.rows for m in [row.stat(lambda r: r.summary.get("test_accuracy"))[0]]]
    ax.set_ylim(max(0.0, min(lows) - 0.1), min(1.0, max(lows) + 0.1))
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7, loc="best")
    return fig


def accuracy_versus_bytes(table: Table, suptitle: str, targets: float | Sequence[float]) -> Figure:
    """Test accuracy against the bytes sent so far (up + down, all clients): the price of
    accuracy; a dashed line at each target accuracy."""
    fig, (ax,) = figure(suptitle)
    labels = [label(row.setting, table.factors) for row in table.rows]
    colors = _colors(labels)
    for lab, row in zip(labels, table.rows):
        curve = row.mean_curve()
        ax.plot([p.sent / 1e6 for p in curve], [p.mean for p in curve], marker="o", markersize=3,
                color=colors[lab], label=lab)
    shown = [t for t in as_targets(targets) if not math.isnan(t)]
    for i, target in enumerate(shown):  # one legend entry names them all
        ax.axhline(target, color="black", linestyle="--", linewidth=1,
                   label=("target accuracy " + ", ".join(f"{t:.3f}" for t in shown)) if i == 0
                   else "_target")
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:g}"))
    ax.xaxis.set_minor_formatter(FuncFormatter(_minor_label(*ax.get_xlim())))
    ax.set_xlabel("MB sent so far, uploads + downloads of all clients (log scale)")
    ax.set_ylabel(ACCURACY)
    n = len(table.seeds)
    ax.set_title(f"test accuracy against communication (mean over {n} seed{'s' if n != 1 else ''})",
                 fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="best")
    return fig


def _minor_label(lo: float, hi: float):
    """Labels for a log axis' minor ticks that do not collide: all of them within one decade,
    only 2× and 5× across a few, none across more (the decades alone are labelled)."""
    decades = math.log10(hi / lo)
    wanted = None if decades < 1 else ({2, 5} if decades < 2.5 else set())

    def label(x: float, _) -> str:
        mantissa = round(x / 10 ** math.floor(math.log10(x) + 1e-9))
        return f"{x:g}" if wanted is None or mantissa in wanted else ""
    return label


def _dodge(x: float, shift: float, categorical: bool, logx: bool) -> float:
    if categorical:
        return x + shift
    return x * 2 ** shift if logx else x  # a linear number axis keeps exact positions


def _sortable(v: Any) -> tuple:
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (0, float(v), "")
    return (1, 0.0, str(v))


def _tick(key: str, v: Any) -> str:
    if key == EPSILON and isinstance(v, float) and math.isinf(v):
        return "∞\n(no DP)"
    return show(v)


def _axis_label(key: str, table: Table) -> str:
    if key == EPSILON:
        delta = table.fixed.get("privacy.delta")
        return (f"privacy budget ε per client over the whole run (δ = {delta:g}; "
                "smaller = more private)" if delta is not None else "privacy budget ε per client")
    if key == "method.alpha":
        r = table.fixed.get("method.rank")
        return f"LoRA scaling α (update = α/r · B·A{f', r = {r}' if r else ''}; log scale)"
    if key == "train.lr":
        return "learning rate of the local optimizer"
    return key
