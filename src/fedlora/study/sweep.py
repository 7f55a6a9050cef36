"""`fedlora sweep`: every run of a grid, one after another, each in its own run folder.

A run folder `OUT/NAME` is complete or absent (see outputs.py), so a re-run of the same sweep
skips every complete folder (after checking it holds the same config), continues an interrupted
run from `OUT/NAME.partial/` with `fedlora.run(resume=...)`, and starts the rest. Interrupting a
sweep and starting it again therefore loses at most the rounds since the last checkpoint.

`shard=(i, n)` splits one sweep over n processes or machines that share the out folder: shard i
makes every n-th run (selection runs and final runs alike), then waits until the selection runs
of every shard are complete before choosing, so each shard chooses the same rates.

Runs go through `fedlora.run` in this process, one at a time. Each builds its own model: the
LoRA A matrices and the head are drawn from the run's seed when the model is built, and loading
the small encoder takes about a second against minutes of training, so sharing one would buy
nothing and risk leaking one run's state into the next.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import fedlora
from fedlora.config import Config, load_config
from fedlora.errors import ConfigError, FedloraError
from fedlora.fsutil import atomic_write_bytes
from fedlora.outputs import PARTIAL
from fedlora.study import select as sel
from fedlora.study.grid import Grid, Run, flat_config, identity
from fedlora.study.runs import load_run

SELECT_DIR = "select"
_sleep = time.sleep  # a name of our own, so a test can stand in for the shards' waiting


@dataclass
class Progress:
    """Counts and an estimate of the time left, across the whole sweep."""

    total: int
    say: Callable[[str], None]
    done: int = 0
    ran: list[float] = field(default_factory=list)   # seconds of each run this process made
    counts: dict[str, int] = field(default_factory=lambda: {"ran": 0, "resumed": 0, "skipped": 0,
                                                           "copied": 0})

    def left(self, remaining: int) -> str:
        if not self.ran or not remaining:
            return ""
        minutes = remaining * sum(self.ran) / len(self.ran) / 60
        return f" · ~{minutes:.0f} min left" if minutes < 90 else f" · ~{minutes / 60:.1f} h left"


def out_dir(grid: Grid, out: str | Path | None) -> Path:
    if out is not None:
        return Path(out)
    if grid.out:
        return Path(grid.out)
    return Path("runs") / f"sweep-{Path(grid.source).stem}"


def select_dir(grid: Grid, out: Path) -> Path:
    """Where the selection runs go: `select.out`, relative to the sweep's out folder."""
    if grid.select and grid.select.out:
        return Path(os.path.normpath(out / grid.select.out))
    return out / SELECT_DIR


def sweep(grid: Grid, out: str | Path | None = None, *,
          progress: Callable[[str], None] | None = print, dry_run: bool = False,
          shard: tuple[int, int] | None = None, poll_s: float = 10.0) -> dict:
    """Run the grid; returns {"out", "runs": [final run folders], "selection": ... or None}.

    `shard=(i, n)` (0 ≤ i < n) makes runs i, i+n, i+2n, … of the selection runs and of the
    final runs; "runs" then lists this shard's final run folders only."""
    say = progress or (lambda _: None)
    i, n = shard or (0, 1)
    out = out_dir(grid, out)
    final = grid.kept(grid.runs())
    planned = grid.kept(grid.selection_runs(), selection=True) if grid.select else []
    finals = final_count(grid, final) if grid.select else len(final)
    total = len(planned[i::n]) + len(range(i, finals, n))
    chosen_in = select_dir(grid, out)
    say(_plan(grid, out, chosen_in, planned, len(planned) + finals)
        + (f" — shard {i + 1}/{n}: {total} of them" if n > 1 else ""))
    for note in grid.notes:
        say(note)
    if dry_run:
        _dry_run(grid, out, chosen_in, planned, final, (i, n), say)
        return {"out": str(out), "runs": [], "selection": None}
    started = time.perf_counter()
    preflight([r.config for r in planned + final])
    tracker = Progress(total, say)
    copies: dict[str, Path] = {}
    selection = None
    if grid.select:
        for run in planned[i::n]:
            _run_one(run, chosen_in, tracker, f"{chosen_in}/")
        folders = _await_selection(planned, chosen_in, say, poll_s) if n > 1 else \
            [chosen_in / run.name for run in planned]
        copies = {identity(r.config): f for r, f in zip(planned, folders)}
        selection = _choose(grid, out, chosen_in, planned, folders, say)
        final = grid.kept(grid.final_runs(lambda config: sel.lookup(grid.select, selection,
                                                                    flat_config(config))))
    folders = [_run_one(run, out, tracker, "", copies) for run in final[i::n]]
    c = tracker.counts
    say(f"sweep{f' shard {i + 1}/{n}' if n > 1 else ''} done in "
        f"{(time.perf_counter() - started) / 60:.1f} min: {len(folders)} run "
        f"folders in {out} ({c['ran']} run, {c['resumed']} resumed, "
        f"{c['skipped']} already complete, {c['copied']} copied from the selection runs) — "
        f"tables and plots: fedlora report {out}")
    return {"out": str(out), "runs": [str(f) for f in folders],
            "selection": None if selection is None else sel.to_json(grid.select, selection)}


def _dry_run(grid: Grid, out: Path, chosen_in: Path, planned: list[Run], final: list[Run],
             shard: tuple[int, int], say: Callable[[str], None]) -> None:
    """List the runs and their state, writing nothing. The final runs of a grid with [select]
    are known once every selection run is complete (the choice is read, not written)."""
    i, n = shard
    for run in planned[i::n]:
        say(f"  {_state(chosen_in / run.name, run.config)}  {chosen_in / run.name}")
    if grid.select:
        folders = [chosen_in / run.name for run in planned]
        if not all(f.exists() and _same_config(f, r.config) is None
                   for r, f in zip(planned, folders)):
            say("  (the final runs are listed once every selection run is complete)")
            return
        choices = sel.choose(grid.select, _scores(grid, planned, folders))
        say(f"  chosen on {grid.select.metric}: {sel.summary_line(grid.select, choices)}")
        final = grid.kept(grid.final_runs(lambda config: sel.lookup(grid.select, choices,
                                                                    flat_config(config))))
    for run in final[i::n]:
        say(f"  {_state(out / run.name, run.config)}  {run.name}")


def parse_shard(text: str) -> tuple[int, int]:
    """"I/N" (1-based, as a user counts: 1/4 … 4/4) → (I-1, N)."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        i = n = 0
    if not 1 <= i <= n:
        raise ConfigError(f"--shard {text!r}: expected I/N with 1 ≤ I ≤ N, e.g. --shard 2/4 for "
                          "the second of four processes sharing the sweep's out folder")
    return i - 1, n


def _await_selection(planned: list[Run], chosen_in: Path, say: Callable[[str], None],
                     poll_s: float) -> list[Path]:
    """Wait until every selection run (other shards' too) is complete; a run folder exists
    only once complete, so its existence is the signal."""
    folders = [chosen_in / run.name for run in planned]
    said = -1
    while (done := sum(f.exists() for f in folders)) < len(folders):
        if done != said:
            say(f"waiting for the other shards' selection runs: {done} of {len(folders)} "
                f"complete in {chosen_in}")
            said = done
        _sleep(poll_s)
    for run, folder in zip(planned, folders):
        diff = _same_config(folder, run.config)
        if diff is not None:
            raise ConfigError(f"'{folder}' holds a run of another config ({diff}) — remove it, "
                              "or give the sweep another out folder (--out or sweep.out)")
    return folders


def final_count(grid: Grid, final: list[Run]) -> int:
    """How many final runs a grid with [select] makes: its runs with the chosen keys left out."""
    over = set(grid.select.over)
    return len({json.dumps({k: v for k, v in flat_config(r.config).items()
                            if k not in over and k != "threads"}, sort_keys=True, default=str)
                for r in final})


def _plan(grid: Grid, out: Path, chosen_in: Path, planned: list[Run], total: int) -> str:
    if not grid.select:
        return f"sweep {grid.source}: {total} runs → {out}/"
    s = grid.select
    return (f"sweep {grid.source}: {total} runs → {out}/: {len(planned)} choosing "
            f"{', '.join(s.over)} on {s.metric}"
            + (f" per {', '.join(s.per)}" if s.per else "")
            + f" (in {chosen_in}/), then {total - len(planned)} at the chosen values")


def _state(folder: Path, config: Config) -> str:
    if folder.exists():
        return "complete   " if _same_config(folder, config) is None else "OTHER CONFIG"
    return "interrupted" if _partial(folder).exists() else "to run     "


def _partial(folder: Path) -> Path:
    return folder.with_name(folder.name + PARTIAL)


def _same_config(folder: Path, config: Config) -> str | None:
    """None if `folder/config.toml` holds `config` (threads aside), else what differs."""
    try:
        stored = load_config(folder / "config.toml")
    except FedloraError as err:  # missing or unreadable: not this run
        return f"no readable config.toml ({err})"
    if identity(stored) == identity(config):
        return None
    a, b = flat_config(stored), flat_config(config)
    diff = [f"{k}: {a[k]!r} there, {b[k]!r} here" for k in a if k != "threads" and a[k] != b[k]]
    return "; ".join(diff[:3])


def _run_one(run: Run, out: Path, tracker: Progress, label: str,
             copies: dict[str, Path] | None = None) -> Path:
    folder, partial = out / run.name, _partial(out / run.name)
    tracker.done += 1
    head = f"[{tracker.done}/{tracker.total}] {label}{run.name}"
    if folder.exists():
        diff = _same_config(folder, run.config)
        if diff is not None:
            raise ConfigError(f"'{folder}' holds a run of another config ({diff}) — remove it, "
                              "or give the sweep another out folder (--out or sweep.out)")
        tracker.counts["skipped"] += 1
        tracker.say(f"{head} · complete, skipped")
        return folder
    source = (copies or {}).get(identity(run.config))
    if source is not None and not partial.exists():
        # the same config and seed give the same run: copy the selection run, do not redo it
        shutil.copytree(source, partial)
        os.replace(partial, folder)
        tracker.counts["copied"] += 1
        tracker.say(f"{head} · same config as selection run {source}, copied")
        return folder
    resume = partial.exists()
    if resume:
        diff = _same_config(partial, run.config)
        if diff is not None:
            raise ConfigError(f"'{partial}' holds an interrupted run of another config ({diff}) — "
                              "remove it, or give the sweep another out folder")
    tracker.say(f"{head} · {'resuming' if resume else 'running'}")
    start = time.perf_counter()
    indent = lambda line: tracker.say("    " + line.replace("\n", "\n    "))  # noqa: E731
    try:
        if resume:
            summary = fedlora.run(run.config, resume=folder, progress=indent)
        else:
            summary = fedlora.run(run.config, folder, progress=indent)
    except BaseException as err:
        err.add_note(f"run `fedlora sweep` again with the same grid to continue the sweep "
                     f"({tracker.done - 1} of {tracker.total} runs were done)")
        raise
    tracker.ran.append(time.perf_counter() - start)
    tracker.counts["resumed" if resume else "ran"] += 1
    remaining = tracker.total - tracker.done
    acc = summary.get("test_accuracy")
    val = summary.get("validation_accuracy")
    tracker.say(f"{head} · done in {tracker.ran[-1] / 60:.1f} min"
                + (f" · test acc {acc:.3f}" if acc is not None else "")
                + (f" · val acc {val:.3f}" if val is not None else "")
                + tracker.left(remaining))
    return folder


def _choose(grid: Grid, out: Path, chosen_in: Path, runs: list[Run], folders: list[Path],
            say: Callable[[str], None]) -> list[sel.Choice]:
    """This sweep's choices, from its selection runs. The record written to OUT/selection.*
    also keeps every other group of the whole grid whose selection runs are all complete, so a
    sweep with `--only method.name=…` does not erase what an earlier one chose."""
    choices = sel.choose(grid.select, _scores(grid, runs, folders))
    mine = {r.name for r in runs}
    earlier = [(r, chosen_in / r.name) for r in _complete_groups(grid, chosen_in)
               if r.name not in mine]
    record = sel.choose(grid.select, _scores(grid, [*runs, *(r for r, _ in earlier)],
                                             [*folders, *(f for _, f in earlier)]))
    order = list(dict.fromkeys(_group(grid, flat_config(r.config)) for r in grid.selection_runs()))
    record.sort(key=lambda c: order.index(_group(grid, c.group)))  # the grid's order
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "selection.json", (json.dumps(
        _jsonable(sel.to_json(grid.select, record)), indent=2) + "\n").encode())
    atomic_write_bytes(out / "selection.md", sel.to_markdown(grid.select, record).encode())
    say(f"chosen on {grid.select.metric}: {sel.summary_line(grid.select, choices)} "
        f"(details: {out / 'selection.md'})")
    return choices


def _complete_groups(grid: Grid, chosen_in: Path) -> list[Run]:
    """The whole grid's selection runs in groups (of `select.per`) whose every run is complete."""
    groups: dict[tuple, list[Run]] = {}
    for run in grid.selection_runs():
        groups.setdefault(_group(grid, flat_config(run.config)), []).append(run)
    return [r for runs in groups.values()
            if all((chosen_in / r.name).is_dir() and _same_config(chosen_in / r.name, r.config)
                   is None for r in runs) for r in runs]


def _group(grid: Grid, values: dict) -> tuple:
    """The group (values of `select.per`) of a flat config, hashable."""
    return tuple(repr(values[k]) for k in grid.select.per)


def _scores(grid: Grid, runs: list[Run], folders: list[Path]) -> list[tuple]:
    """(name, flat config, last value of the selection metric) of each selection run."""
    results = []
    for run, folder in zip(runs, folders):
        score = load_run(folder).last(grid.select.metric)
        if score is None:
            raise ConfigError(f"'{folder}' reports no {grid.select.metric} — the selection runs "
                              "need data.validation_fraction > 0")
        results.append((run.name, flat_config(run.config), score))
    return results


def _jsonable(x):
    """JSON has no infinity or NaN: written as "inf"/"nan", as run folders do."""
    if isinstance(x, float) and not math.isfinite(x):
        return str(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


def preflight(configs: list[Config]) -> None:
    """Model and data problems found before the first run writes anything: each distinct model
    path is resolved and each distinct data set loaded once (seconds, against hours of runs)."""
    from fedlora.experiment import load_data
    from fedlora.model import resolve_model_path

    for path in dict.fromkeys(c.model.path for c in configs):
        resolve_model_path(path)
    seen = set()
    for config in configs:
        # the seed matters to loading only through the data.max_examples subsample
        key = json.dumps([config.data.__dict__, config.seed if config.data.max_examples else 0,
                          config.federation.clients], default=str)
        if key not in seen:
            seen.add(key)
            load_data(config)
