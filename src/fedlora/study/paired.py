"""Methods compared seed by seed: the paired differences behind "is A better than B?".

Runs of two methods with the same seed share the client split, the LoRA A matrices, the head's
initialisation and the batch order, so most of the seed-to-seed spread cancels in their
difference. For every setting of the other factors (ε, α, the data split, …) and every method m
other than the baseline b (`lora`, FedIT, when present; else the first method):

    d_s = acc_m(s) − acc_b(s)           over the seeds s both have (final test accuracy)
    mean ± sample std of d_s, how many d_s > 0, and the paired t = mean / (std / √n)

With n seeds, t has n − 1 degrees of freedom; beside t we print the |t| a 5% two-sided test
would need at that n (12.71 at n = 2, 4.30 at n = 3, 2.78 at n = 5: few seeds need a large t)
and leave the verdict to the reader.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass

from fedlora.study.table import Row, Table, mean_std, name, show, value_order

METHOD = "method.name"
BASELINE = "lora"

# Student's t, 97.5% quantile, for 1 … 30 degrees of freedom (scipy.stats.t.ppf(0.975, df);
# the tests check it). Past 30 we keep 30's value, slightly above the true one: never too lenient.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
         2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
         2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_needed(n: int) -> float:
    """The |t| a paired t-test of n differences needs for 5% two-sided; nan below n = 2."""
    return T_975[min(n - 1, len(T_975)) - 1] if n >= 2 else math.nan


@dataclass
class Pair:
    setting: dict          # the other factors' values
    method: str
    baseline: str
    seeds: list[int]
    diffs: list[float]     # method − baseline, seed by seed

    @property
    def mean_std(self) -> tuple[float, float]:
        return mean_std(self.diffs)

    @property
    def wins(self) -> int:
        return sum(d > 0 for d in self.diffs)

    @property
    def t(self) -> float:
        m, s = self.mean_std
        return m / (s / math.sqrt(len(self.diffs))) if s and math.isfinite(s) else math.nan


def pairs(table: Table) -> list[Pair]:
    """Every method against the baseline, per setting of the other factors; [] when the method
    does not vary or no two methods share a seed."""
    if METHOD not in table.factors:
        return []
    methods = list(dict.fromkeys(r.setting[METHOD] for r in table.rows))
    baseline = BASELINE if BASELINE in methods else methods[0]
    others = [k for k in table.factors if k != METHOD]
    groups: dict[tuple, dict[str, Row]] = {}
    by_setting = sorted(table.rows, key=lambda r: tuple(  # ε 1, 3, 6, ∞; methods as they were
        value_order(k, r.setting[k], r.runs[0].flat) for k in others))
    for row in by_setting:
        key = tuple(repr(row.setting[k]) for k in others)
        groups.setdefault(key, {})[row.setting[METHOD]] = row
    out = []
    for rows in groups.values():
        base = rows.get(baseline)
        if base is None:
            continue
        for method, row in rows.items():
            if method == baseline:
                continue
            a, b = _by_seed(row), _by_seed(base)
            seeds = sorted(set(a) & set(b))
            if seeds:
                out.append(Pair({k: row.setting[k] for k in others}, method, baseline, seeds,
                                [a[s] - b[s] for s in seeds]))
    return out


def _by_seed(row: Row) -> dict[int, float]:
    return {run.flat["seed"]: float(run.summary["test_accuracy"]) for run in row.runs
            if run.summary.get("test_accuracy") is not None}


def to_csv(found: list[Pair]) -> str:
    """One line per pair and seed: the other factors, method, baseline, seed, difference."""
    if not found:
        return ""
    keys = list(found[0].setting)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow([*keys, "method", "baseline", "seed", "test_accuracy_difference"])
    for p in found:
        for seed, d in zip(p.seeds, p.diffs):
            writer.writerow([*(p.setting[k] for k in keys), p.method, p.baseline, seed, repr(d)])
    return buf.getvalue()


def to_markdown(found: list[Pair]) -> str:
    if not found:
        return ""
    keys = list(found[0].setting)
    head = [name(k) for k in keys] + ["method − baseline", "seeds", "difference per seed",
                                      "mean ± std", "ahead in", "paired t",
                                      r"\|t\| needed (5%)"]  # escaped: a bare | splits a Markdown cell
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for p in found:
        m, s = p.mean_std
        cells = [show(p.setting[k]) for k in keys] + [
            f"{p.method} − {p.baseline}", ", ".join(map(str, p.seeds)),
            " / ".join(f"{d:+.3f}" for d in p.diffs),
            f"{m:+.3f} ± " + ("–" if math.isnan(s) else f"{s:.3f}"),
            f"{p.wins} of {len(p.diffs)}", "–" if math.isnan(p.t) else f"{p.t:.2f}",
            "–" if len(p.diffs) < 2 else f"{t_needed(len(p.diffs)):.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
