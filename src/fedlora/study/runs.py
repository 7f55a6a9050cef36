"""Complete run folders read back: the resolved config, summary.json and metrics.jsonl."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedlora.config import Config, load_config
from fedlora.errors import FedloraError
from fedlora.outputs import PARTIAL
from fedlora.study.grid import flat_config


class ReportError(FedloraError):
    """The folders given to `fedlora report` hold no usable runs."""


@dataclass
class RunResult:
    path: Path
    config: Config
    flat: dict[str, Any]            # flat resolved config, e.g. {"method.name": "ffa", ...}
    summary: dict[str, Any]
    metrics: list[dict[str, Any]]   # one record per round

    @property
    def name(self) -> str:
        return self.path.name

    def last(self, key: str) -> float | None:
        """`key` at the last round that reported it (e.g. the final validation accuracy)."""
        for record in reversed(self.metrics):
            if record.get(key) is not None:
                return _number(record[key])
        return None

    def subset_rounds(self) -> set[int]:
        """Rounds scored on a subset of the test set (`federation.eval_examples`): only those
        records carry `test_examples`; the last round and the summary use the whole set."""
        return {int(r["round"]) for r in self.metrics if r.get("test_examples") is not None}

    def curve(self, key: str = "test_accuracy") -> list[tuple[int, float, int]]:
        """(round, value, bytes up+down so far) at every round that reported `key`."""
        out, sent = [], 0
        for record in self.metrics:
            sent += int(record.get("bytes_uploaded", 0)) + int(record.get("bytes_downloaded", 0))
            if record.get(key) is not None:
                out.append((int(record["round"]), _number(record[key]), sent))
        return out


def is_run(folder: Path) -> bool:
    return (folder / "summary.json").is_file() and (folder / "config.toml").is_file()


def load_run(folder: str | Path) -> RunResult:
    folder = Path(folder)
    try:
        config = load_config(folder / "config.toml")
        summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
        lines = (folder / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        metrics = [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError, FedloraError) as err:
        raise ReportError(f"'{folder}' is not a readable run folder ({err}) — remove it or re-run it") from None
    return RunResult(folder, config, flat_config(config), summary, metrics)


def find_runs(dirs: list[str | Path]) -> list[RunResult]:
    """Each DIR is a run folder, or a folder whose sub-folders are run folders (a sweep's out)."""
    found: list[Path] = []
    for d in map(Path, dirs):
        if d.name.endswith(PARTIAL):
            raise ReportError(f"'{d}' is an unfinished run — finish it (`fedlora run --resume "
                              f"{str(d)[:-len(PARTIAL)]}` or re-run the sweep) or leave it out")
        if not d.is_dir():
            raise ReportError(f"'{d}' is not a folder — give run folders or a sweep's folder")
        if is_run(d):
            found.append(d)
            continue
        inside = sorted(p for p in d.iterdir() if p.is_dir() and is_run(p))
        if not inside:
            raise ReportError(f"'{d}' holds no complete run folders (a run folder has summary.json "
                              "and config.toml; DIR.partial folders are unfinished runs)")
        found += inside
    unique = list(dict.fromkeys(p.resolve() for p in found))
    return [load_run(p) for p in unique]


def _number(x: Any) -> float:
    """JSON has no infinity: run folders write "inf"/"nan" as strings."""
    if isinstance(x, str):
        return float(x)
    return float(x) if x is not None else math.nan
