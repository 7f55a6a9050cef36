"""Runs grouped by setting: one row per setting, mean ± std over its seeds.

A *setting* is the value of every config key that differs between the runs, except `seed` (the
repetitions) and `threads` (speed only). `std` is the sample standard deviation (n − 1 in the
denominator), as in the paper's "mean ± std over runs"; with one run it is undefined (NaN, shown
as "–"). `data.partition` and `data.dirichlet_alpha` are shown together as one key, the data
split ("IID", "Dirichlet(0.5)", "by movie_name"): α means nothing for the other partitions.
"""

from __future__ import annotations

import csv
import io
import math
import statistics
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

from fedlora.study.runs import ReportError, RunResult

SPLIT = "data.split"
IGNORED = ("seed", "threads")
SPLIT_KEYS = ("data.partition", "data.dirichlet_alpha")
NAMES = {"method.name": "method", "privacy.epsilon": "ε", "method.alpha": "α", "train.lr": "lr",
         SPLIT: "data split", "method.rank": "r", "federation.clients": "clients",
         "federation.rounds": "rounds", "federation.local_steps": "local steps"}


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n − 1); NaN where undefined."""
    if not values:
        return math.nan, math.nan
    if not all(math.isfinite(v) for v in values):  # e.g. ε = ∞ of non-private runs: no spread
        return statistics.fmean(values), math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else math.nan)


def split_label(flat: dict[str, Any]) -> str:
    partition = flat["data.partition"]
    if partition == "iid":
        return "IID"
    if partition == "dirichlet":
        return f"Dirichlet({flat['data.dirichlet_alpha']:g})"
    return f"by {flat['data.group_column']}"


def split_order(flat: dict[str, Any]) -> tuple:
    """From the least to the most heterogeneous: IID, Dirichlet with α falling, natural groups."""
    partition = flat["data.partition"]
    if partition == "iid":
        return (0, 0.0)
    if partition == "dirichlet":
        return (1, -flat["data.dirichlet_alpha"])
    return (2, 0.0)


@dataclass
class Row:
    setting: dict[str, Any]          # varied key → value (SPLIT → its label)
    runs: list[RunResult]

    def values(self, get: Callable[[RunResult], Any]) -> list[float]:
        """`get` of every run where it is a number (None: the run does not report it)."""
        out = []
        for run in self.runs:
            v = get(run)
            if v is not None:
                out.append(float(v))
        return out

    def stat(self, get: Callable[[RunResult], Any]) -> tuple[float, float]:
        return mean_std(self.values(get))

    def subset_rounds(self) -> set[int]:
        """Rounds that any of the runs scored on a test subset, not the whole test set."""
        return set().union(*(run.subset_rounds() for run in self.runs))

    def mean_curve(self, key: str = "test_accuracy") -> list[CurvePoint]:
        """(round, mean, std, mean bytes up+down so far, runs) over the runs that evaluated each
        round, at every round any of them evaluated."""
        by_round: dict[int, list[tuple[float, int]]] = {}
        for run in self.runs:
            for rnd, value, sent in run.curve(key):
                by_round.setdefault(rnd, []).append((value, sent))
        out = []
        for rnd in sorted(by_round):
            m, s = mean_std([v for v, _ in by_round[rnd]])
            out.append(CurvePoint(rnd, m, s, statistics.fmean(b for _, b in by_round[rnd]),
                                  len(by_round[rnd])))
        return out


class CurvePoint(NamedTuple):
    round: int
    mean: float
    std: float
    sent: float      # mean bytes (up + down, all clients) sent by the end of the round
    runs: int        # how many of the row's runs scored this round


@dataclass
class Table:
    keys: list[str]                  # varied keys, display order
    rows: list[Row]
    fixed: dict[str, Any]            # keys with one value in every run
    seeds: list[int]

    def has(self, key: str) -> bool:
        return key in self.factors

    @property
    def factors(self) -> list[str]:
        """The varied keys that are crossed with the others. A key whose value the other keys
        already determine (a learning rate chosen per method) is not one: it has no line to
        draw and nothing to add to a label. Found greedily from the last key, keeping the
        method: drop a key while the remaining ones still tell every row apart."""
        keep = list(self.keys)
        for key in reversed(self.keys):
            rest = [k for k in keep if k != key]
            if rest and len({tuple(repr(r.setting[k]) for k in rest) for r in self.rows}) == len(self.rows):
                keep = rest
        return keep


def group(runs: list[RunResult]) -> Table:
    if not runs:
        raise ReportError("no runs to report")
    flats = [r.flat for r in runs]
    raw = [k for k in flats[0] if k not in IGNORED and len({repr(f.get(k)) for f in flats}) > 1]
    varied = list(raw)
    if any(k in varied for k in SPLIT_KEYS):
        at = min(varied.index(k) for k in SPLIT_KEYS if k in varied)
        varied = [k for k in varied if k not in SPLIT_KEYS]
        varied.insert(at, SPLIT)
    # the method first: every table and legend is read method by method
    keys = sorted(varied, key=lambda k: k != "method.name")
    rows: dict[tuple, Row] = {}
    seen: dict[tuple, str] = {}
    for run in runs:
        setting = {k: (split_label(run.flat) if k == SPLIT else run.flat[k]) for k in keys}
        ident = tuple(repr(v) for v in setting.values())
        twin = seen.get(ident + (run.flat["seed"],))
        if twin is not None:
            raise ReportError(f"'{twin}' and '{run.path}' are the same setting with the same "
                              "seed — give each run once")
        seen[ident + (run.flat["seed"],)] = str(run.path)
        rows.setdefault(ident, Row(setting, [])).runs.append(run)
    ordered = sorted(rows.values(), key=lambda row: tuple(
        value_order(k, row.setting[k], row.runs[0].flat) for k in keys))
    fixed = {k: v for k, v in flats[0].items() if k not in IGNORED and k not in raw}
    if SPLIT not in keys:
        fixed[SPLIT] = split_label(flats[0])
    seeds = sorted({f["seed"] for f in flats})
    return Table(keys, ordered, fixed, seeds)


def value_order(key: str, value: Any, flat: dict[str, Any]) -> tuple:
    """Sort key of a factor's value: numbers ascending (∞ last), then words; splits by skew."""
    if key == SPLIT:
        return split_order(flat)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return (0, float(value), "")
    return (1, 0.0, str(value))


def show(value: Any) -> str:
    if isinstance(value, float):
        return "∞" if math.isinf(value) else f"{value:g}"
    if isinstance(value, list):
        return "[" + ", ".join(show(v) for v in value) + "]"
    return str(value)


def name(key: str) -> str:
    return NAMES.get(key, key.rpartition(".")[2])


def label(setting: dict[str, Any], keys: list[str] | None = None) -> str:
    """`ffa · ε=3 · lr=0.01`: the method bare, the other keys as name=value."""
    parts = []
    for k in keys if keys is not None else list(setting):
        parts.append(show(setting[k]) if k in ("method.name", SPLIT) else f"{name(k)}={show(setting[k])}")
    return " · ".join(parts) or "all runs"


# ---------------------------------------------------------------------------- columns


def _eps(run: RunResult) -> float:
    e = run.summary.get("epsilon")
    return float(e) if e is not None else None


COLUMNS: list[tuple[str, Callable[[RunResult], Any]]] = [
    ("test_accuracy", lambda r: r.summary.get("test_accuracy")),
    ("validation_accuracy", lambda r: r.summary.get("validation_accuracy")),
    ("epsilon_spent", _eps),
    ("bytes_uploaded", lambda r: r.summary.get("bytes_uploaded")),
    ("bytes_downloaded", lambda r: r.summary.get("bytes_downloaded")),
    ("wall_seconds", lambda r: r.summary.get("wall_seconds")),
    ("majority_accuracy", lambda r: r.summary.get("majority_accuracy")),
]


def to_csv(table: Table) -> str:
    """Machine-readable: full key names, then `<column>_mean`/`<column>_std` for every column."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.keys, "runs", *(f"{c}_{s}" for c, _ in COLUMNS for s in ("mean", "std")),
                "run_folders"])
    for row in table.rows:
        stats = [x for _, get in COLUMNS for x in row.stat(get)]
        w.writerow([*(show(row.setting[k]) for k in table.keys), len(row.runs),
                    *(_num(x) for x in stats), ";".join(r.name for r in row.runs)])
    return buf.getvalue()


def _num(x: float) -> str:
    return "" if math.isnan(x) else repr(x)


def pm(mean: float, std: float, digits: int = 3) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if not math.isnan(std) else f"{mean:.{digits}f} ± –"


def to_markdown(table: Table) -> str:
    has_val = any(r.values(COLUMNS[1][1]) for r in table.rows)
    head = [*(name(k) for k in table.keys), "runs", "test accuracy"]
    head += ["validation accuracy"] if has_val else []
    head += ["ε spent (max over clients)", "MB up / down per run", "minutes per run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table.rows:
        get = dict(COLUMNS)
        eps = row.stat(get["epsilon_spent"])[0]
        up, down = row.stat(get["bytes_uploaded"])[0], row.stat(get["bytes_downloaded"])[0]
        cells = [*(show(row.setting[k]) for k in table.keys), str(len(row.runs)),
                 pm(*row.stat(get["test_accuracy"]))]
        cells += [pm(*row.stat(get["validation_accuracy"]))] if has_val else []
        cells += ["∞ (no DP)" if math.isinf(eps) else f"{eps:.2f}",
                  f"{up / 1e6:.2f} / {down / 1e6:.2f}",
                  f"{row.stat(get['wall_seconds'])[0] / 60:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- per round


def curves_csv(table: Table) -> str:
    """The numbers behind the per-round figure: one row per setting and scored round, the mean
    and sample std over the runs that scored it, and the mean MB sent by then."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.keys, "round", "runs", "test_accuracy_mean", "test_accuracy_std",
                "mb_sent_mean", "test_subset"])
    for row in table.rows:
        subset = row.subset_rounds()
        for p in row.mean_curve():
            w.writerow([*(show(row.setting[k]) for k in table.keys), p.round, p.runs,
                        _num(p.mean), _num(p.std), repr(p.sent / 1e6),
                        str(p.round in subset).lower()])
    return buf.getvalue()


def curves_markdown(table: Table) -> str:
    """One row per setting: mean test accuracy after each round; ≈ marks a round scored on the
    fixed test subset (`federation.eval_examples`), – one that none of its runs scored."""
    curves = [row.mean_curve() for row in table.rows]
    rounds = sorted({p.round for curve in curves for p in curve})
    head = [*(name(k) for k in table.keys), "runs",
            f"test accuracy after rounds {_span(rounds)} (mean over seeds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row, curve in zip(table.rows, curves):
        by_round = {p.round: p.mean for p in curve}
        subset = row.subset_rounds()
        cells = [("≈" if r in subset else "") + f"{by_round[r]:.3f}" if r in by_round else "–"
                 for r in rounds]
        lines.append("| " + " | ".join([*(show(row.setting[k]) for k in table.keys),
                                         str(len(row.runs)), ", ".join(cells)]) + " |")
    return "\n".join(lines) + "\n"


def _span(rounds: list[int]) -> str:
    if not rounds:
        return "–"
    if rounds == list(range(rounds[0], rounds[-1] + 1)) and len(rounds) > 3:
        return f"{rounds[0]} … {rounds[-1]}"
    return ", ".join(map(str, rounds))


# ---------------------------------------------------------------------------- communication


def default_target(table: Table) -> float:
    """The highest test accuracy that every setting's mean curve reaches (so each has a cost)."""
    peaks = [max((p.mean for p in row.mean_curve()), default=math.nan) for row in table.rows]
    peaks = [p for p in peaks if not math.isnan(p)]
    return math.floor(min(peaks) * 1000) / 1000 if peaks else math.nan


def first_hit(run, target: float) -> tuple[int, float, bool] | None:
    """(round, bytes sent so far, exact) at the first scored round with test accuracy ≥ target;
    `exact` is False when the round before it was not scored (federation.eval_every > 1), so
    the target may have been reached earlier: the figures are then upper bounds."""
    scored = [rnd for rnd, _, _ in run.curve()]
    for rnd, acc, sent in run.curve():
        if acc >= target:
            return rnd, float(sent), rnd == 1 or (rnd - 1) in scored
    return None


def bytes_to_target(row: Row, target: float) -> tuple[list[float], int]:
    """Bytes (up + down) each run had sent when it first reached `target` test accuracy, and how
    many of the row's runs reached it at all."""
    hits = [first_hit(run, target) for run in row.runs]
    return [h[1] for h in hits if h is not None], len(row.runs)


def _to_target(row: Row, target: float) -> tuple[list[float], list[float], bool]:
    """Bytes and rounds of the runs that reached the target, and whether any is an upper bound."""
    hits = [h for h in (first_hit(run, target) for run in row.runs) if h is not None]
    return [h[1] for h in hits], [float(h[0]) for h in hits], any(not h[2] for h in hits)


def communication_csv(table: Table, targets: float | Sequence[float]) -> str:
    """One row per target and setting (long format: `target_accuracy` says which)."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*table.keys, "target_accuracy", "runs", "runs_reached", "bytes_to_target_mean",
                "bytes_to_target_std", "rounds_to_target_mean", "upper_bound"])
    for target in as_targets(targets):
        for row in table.rows:
            sent, rounds, bound = _to_target(row, target)
            m, s = mean_std(sent)
            rm, _ = mean_std(rounds)
            w.writerow([*(show(row.setting[k]) for k in table.keys), repr(target), len(row.runs),
                        len(sent), _num(m), _num(s), _num(rm), str(bound).lower()])
    return buf.getvalue()


def communication_markdown(table: Table, targets: float | Sequence[float]) -> str:
    """The bytes-to-target table; with several targets, one block of rows per target, led by a
    target column."""
    targets = as_targets(targets)
    several = len(targets) > 1
    head = [*(["target test accuracy"] if several else []), *(name(k) for k in table.keys),
            "runs reaching it", "MB sent (up + down) to reach it", "rounds"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    any_bound = False
    for target in targets:
        for row in table.rows:
            sent, rounds, bound = _to_target(row, target)
            any_bound |= bound
            m, s = mean_std([b / 1e6 for b in sent])
            rm, _ = mean_std(rounds)
            le = "≤ " if bound else ""
            lines.append("| " + " | ".join([*([f"{target:.3f}"] if several else []),
                                             *(show(row.setting[k]) for k in table.keys),
                                             f"{len(sent)}/{len(row.runs)}",
                                             le + pm(m, s, 2) if sent else "not reached",
                                             "–" if math.isnan(rm) else f"{le}{rm:.1f}"]) + " |")
    note = ("\n≤: some of these runs were not scored after every round (`federation.eval_every`), "
            "so the target may have been reached before the first scored round that shows it: "
            "an upper bound.\n" if any_bound else "")
    return "\n".join(lines) + "\n" + note


def as_targets(targets: float | Sequence[float]) -> tuple[float, ...]:
    """One target or several, as a tuple in the order given, each once."""
    return (targets,) if isinstance(targets, (int, float)) else tuple(dict.fromkeys(targets))
