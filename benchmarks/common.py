"""Helpers every benchmark script shares: memory readings, medians, tables, JSON output.

The scripts run as `PYTHONPATH=src python benchmarks/<name>.py`, so this folder is on
`sys.path` and `import common` finds this file.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
from pathlib import Path
from typing import Any, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def rss_mb() -> float:
    """Resident set size now (Linux /proc); elsewhere the peak from getrusage."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_rss_mb()


def peak_rss_mb() -> float:
    """The process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 10 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,d}"
    return str(v)


def machine() -> dict[str, Any]:
    """What the figures were measured on."""
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def synchronize() -> None:
    """Wait for queued GPU work (if CUDA is in use), so that a clock read next includes it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def write_json(path: str | Path | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}")


def timed_run(config, work: Path, after_setup=None) -> dict[str, Any]:
    """The real simulation path of `fedlora.run` (a run folder with metrics, a checkpoint and
    a privacy ledger per client, update validation, evaluation), with the round loop, the
    transport and the trainer timing their phases (`fedlora.federation.timing`).

    Returns `{"timings": {phase: seconds summed over rounds}, "summary": ..., "setup_seconds"}`;
    `after_setup()` is called once everything is built, before the first round.
    """
    import time

    from fedlora.runner import ServerSide, client_facts, execute
    from fedlora.experiment import build_experiment, majority_accuracy
    from fedlora.federation.timing import phase
    from fedlora.federation.simulation import InProcessTransport
    from fedlora.outputs import RunFolder

    start = time.perf_counter()
    exp = build_experiment(config)
    timings: dict[str, float] = {}
    exp.trainer.timings = timings
    folder = RunFolder(work / "run").open()
    def evaluate(glob, full=True):  # subset rounds and the whole-set last round, apart
        kind = "whole set" if full else "subset"
        timings[f"evaluations: {kind}"] = timings.get(f"evaluations: {kind}", 0) + 1
        with phase(timings, f"evaluate: {kind}"):
            return exp.evaluate(glob, full=full)

    server = ServerSide(config, exp.method, exp.trainer.handle, exp.initial, evaluate,
                        majority_accuracy(exp))
    transport = InProcessTransport(exp.trainer, exp.clients, timings=timings)
    transport.ask_center = _query_apart(transport.ask_center, timings)
    setup = time.perf_counter() - start
    if after_setup:
        after_setup()
    summary = execute(server, transport, folder, lambda _: None, start,
                      lambda: [client_facts(c) for c in exp.clients], exp.clients, None,
                      timings=timings)
    folder.commit()
    return {"timings": timings, "summary": summary, "setup_seconds": setup}


def _query_apart(ask_center, timings: dict[str, float]):
    """The DP feature-centring query (once, before round 1) is timed by the same phases as a
    round (`train`, `serialise`, `ledger`), but it is no round's training: its seconds go under
    `centring query: <phase>` instead."""

    def timed(clients):
        before = dict(timings)
        try:
            return ask_center(clients)
        finally:
            for key, value in list(timings.items()):
                spent = value - before.get(key, 0.0)
                if spent and not key.startswith("centring query"):
                    timings[key] = before.get(key, 0.0)
                    timings[f"centring query: {key}"] = spent
    return timed


def split_round(timings: dict[str, float]) -> dict[str, float]:
    """Seconds per round in the issue's parts: local training, serialisation, aggregation,
    evaluation, and everything else (itemised under `other:`)."""
    n = max(1, int(timings.get("rounds", 1)))
    t = {k: v / n for k, v in timings.items() if k != "rounds"}
    loop = ("download", "exchange", "validate", "aggregate", "evaluate", "report", "checkpoint")
    total = sum(t.get(k, 0.0) for k in loop)
    ledger = t.get("ledger", 0.0)  # inside `train`, but privacy bookkeeping, not training
    parts = {
        "local training": t.get("train", 0.0) - ledger,
        "serialisation": t.get("serialise", 0.0),
        "aggregation": t.get("aggregate", 0.0),
        "evaluation": t.get("evaluate", 0.0),
    }
    other = {
        "other: privacy ledger (digest + fsync'd write)": ledger,
        "other: checkpoint": t.get("checkpoint", 0.0),
        "other: validation of updates": t.get("validate", 0.0),
        "other: download preparation": t.get("download", 0.0),
        "other: metrics line and progress": t.get("report", 0.0),
        "other: transport": t.get("exchange", 0.0) - t.get("train", 0.0) - t.get("serialise", 0.0),
    }
    parts["other"] = sum(other.values())
    return {**parts, **other, "round": total}


def side_by_side_parser(doc: str, methods: list[str]) -> argparse.ArgumentParser:
    """The arguments every side-by-side speed benchmark takes (throughput, precision, clipping):
    config overrides, repeats, local steps per repeat, threads, device, methods, a JSON file."""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("overrides", nargs="*", help="config overrides, section.key=value")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=1, help="local steps per client per repeat")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = all cores)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (config key device)")
    parser.add_argument("--methods", nargs="+", default=methods)
    parser.add_argument("--json", help="also write the results here")
    return parser
