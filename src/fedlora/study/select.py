"""Choosing a hyperparameter fairly: per group, on the validation split, never the test set.

A `[select]` table in a grid, e.g.

    [select]
    metric = "validation_accuracy"   # or validation_loss (smaller is better)
    over = "train.lr"                # the key to choose
    per = ["method.name"]            # chosen separately for each method
    [select.grid]                    # optional: the selection runs use only these values
    seed = [0]
    privacy.epsilon = [3]

makes `fedlora sweep` run in two phases. First the selection runs (the grid, with `[select.grid]`
replacing keys) go to `OUT/select/`. Then, for each group (a value of the `per` keys), each
candidate value of `over` is scored by the mean of `metric` over its runs in the group (every
other varied key, e.g. the seeds, is averaged over), and the best one wins; a tie goes to the
candidate listed first. The chosen values are written to `OUT/selection.json` and
`OUT/selection.md`, and the final runs are the grid's runs with `over` set to their group's
choice. Candidates may differ per group: give each method its own list in a `[[cases]]` table.
The metric is read from the last evaluated round of each run.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from fedlora.errors import ConfigError
from fedlora.study.grid import Selection


@dataclass
class Candidate:
    value: dict[str, Any]     # {over key: value}
    scores: list[float]
    runs: list[str]

    @property
    def mean(self) -> float:
        return statistics.fmean(self.scores)

    @property
    def std(self) -> float:
        return statistics.stdev(self.scores) if len(self.scores) > 1 else math.nan


@dataclass
class Choice:
    group: dict[str, Any]     # {per key: value}
    candidates: list[Candidate]
    chosen: dict[str, Any]


def choose(selection: Selection, results: list[tuple[str, dict[str, Any], float]]) -> list[Choice]:
    """`results`: (run name, its flat resolved config, its metric) → the best value per group.

    NaN scores (a diverged run) rank last."""
    groups: dict[tuple, dict[tuple, Candidate]] = {}
    for name, flat, score in results:
        group = tuple(flat[k] for k in selection.per)
        value = tuple(flat[k] for k in selection.over)
        cand = groups.setdefault(group, {}).setdefault(
            value, Candidate(dict(zip(selection.over, value)), [], []))
        cand.scores.append(score)
        cand.runs.append(name)
    sign = 1 if selection.maximise else -1
    choices = []
    for group, cands in groups.items():
        ranked = list(cands.values())
        best = max(ranked, key=lambda c: -math.inf if math.isnan(c.mean) else sign * c.mean)
        choices.append(Choice(dict(zip(selection.per, group)), ranked, best.value))
    return choices


def lookup(selection: Selection, choices: list[Choice], flat: dict[str, Any]) -> dict[str, Any]:
    """The chosen values for the group of a config (`flat`: its flat resolved keys)."""
    group = {k: flat[k] for k in selection.per}
    for choice in choices:
        if choice.group == group:
            return choice.chosen
    raise ConfigError(f"select: no selection run has {_show(group)} — add it to [select.grid] or "
                      "remove [select.grid]'s restriction")


def to_json(selection: Selection, choices: list[Choice]) -> dict[str, Any]:
    return {
        "metric": selection.metric, "over": selection.over, "per": selection.per,
        "grid": selection.grid,
        "groups": [{"group": c.group, "chosen": c.chosen,
                    "candidates": [{"value": k.value, "mean": k.mean, "std": k.std,
                                    "scores": k.scores, "runs": k.runs} for k in c.candidates]}
                   for c in choices],
    }


def to_markdown(selection: Selection, choices: list[Choice]) -> str:
    best = "highest" if selection.maximise else "lowest"
    lines = [f"Chosen on the validation split: {', '.join(selection.over)} with the {best} mean "
             f"{selection.metric} over its selection runs"
             + (f", separately for each {', '.join(selection.per)}" if selection.per else "") + ".",
             "", "| " + " | ".join(selection.per + ["candidate", f"{selection.metric} (mean ± std)",
                                                   "runs", "chosen"]) + " |",
             "|" + "---|" * (len(selection.per) + 4)]
    for choice in choices:
        for cand in choice.candidates:
            spread = "" if math.isnan(cand.std) else f" ± {cand.std:.4f}"
            mark = "**yes**" if cand.value == choice.chosen else ""
            lines.append("| " + " | ".join([*(_fmt(v) for v in choice.group.values()),
                                            _show(cand.value), f"{cand.mean:.4f}{spread}",
                                            str(len(cand.scores)), mark]) + " |")
    return "\n".join(lines) + "\n"


def summary_line(selection: Selection, choices: list[Choice]) -> str:
    return "; ".join(f"{_show(c.group) or 'all runs'}: {_show(c.chosen)}" for c in choices)


def _show(values: dict[str, Any]) -> str:
    return ", ".join(f"{k}={_fmt(v)}" for k, v in values.items())


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "∞" if math.isinf(v) else f"{v:g}"
    return str(v)
