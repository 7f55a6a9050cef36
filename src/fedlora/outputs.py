"""The run folder: written under a temporary name and renamed when complete.

A run folder therefore appears complete or not at all: a crash, a Ctrl-C or a bad input
leaves no half-written result behind (the temporary folder is removed).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from pathlib import Path
from typing import Any

from fedlora.errors import ConfigError


def default_out_dir(method: str, epsilon: float) -> Path:
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    return Path("runs") / f"{method}-eps{eps}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunFolder:
    def __init__(self, final: str | Path):
        self.final = Path(final)
        if self.final.exists():
            raise ConfigError(f"--out: '{self.final}' already exists — choose a new folder or remove it")
        self.tmp = self.final.with_name(f".{self.final.name}.tmp-{os.getpid()}")

    def open(self) -> "RunFolder":
        self.tmp.mkdir(parents=True, exist_ok=False)
        return self

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_json(self, name: str, data: Any) -> None:
        self.path(name).write_text(json.dumps(_jsonable(data), indent=2) + "\n", encoding="utf-8")

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def append_jsonl(self, name: str, record: dict) -> None:
        with self.path(name).open("a", encoding="utf-8") as f:
            f.write(json.dumps(_jsonable(record)) + "\n")

    def commit(self) -> Path:
        if self.final.exists():
            raise ConfigError(f"--out: '{self.final}' appeared while the run was going — "
                              f"the finished run is left in '{self.tmp}'")
        os.replace(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _jsonable(x: Any) -> Any:
    """JSON has no inf/NaN: write them as strings "inf"/"nan" so every reader can parse the file."""
    if isinstance(x, float):
        if math.isinf(x):
            return "inf" if x > 0 else "-inf"
        return "nan" if math.isnan(x) else x
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x
