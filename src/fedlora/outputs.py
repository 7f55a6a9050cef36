"""The run folder: built as `DIR.partial/`, renamed to `DIR` when complete.

`DIR` therefore appears complete or not at all. While a run is going its work lives in the
visible folder `DIR.partial/`: config, partition, metrics so far, the latest checkpoint and
each client's privacy ledger. What happens to it when the run does not finish:

* bad input found before the first round: nothing is written at all (checked first);
* a crash, Ctrl-C or SIGKILL once training has started: `DIR.partial/` stays, and
  `fedlora run --resume DIR` continues from its last checkpoint (with no checkpoint yet, from
  round 1 — the ledgers still hold what each client spent). A Python-level failure before any
  client has trained removes it, as nothing in it would be worth keeping.

On success the checkpoint is deleted (the results supersede it) and the folder renamed.
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
from fedlora.fsutil import atomic_write_bytes

PARTIAL = ".partial"


def default_out_dir(method: str, epsilon: float) -> Path:
    eps = "inf" if math.isinf(epsilon) else f"{epsilon:g}"
    return Path("runs") / f"{method}-eps{eps}-{time.strftime('%Y%m%d-%H%M%S')}"


class RunFolder:
    def __init__(self, final: str | Path, *, resume: bool = False):
        final = Path(final)
        if final.name.endswith(PARTIAL):  # `--resume DIR.partial` means DIR
            final = final.with_name(final.name[: -len(PARTIAL)])
        self.final = final
        self.partial = final.with_name(final.name + PARTIAL)
        self.resuming = resume
        self._lock = None
        if resume:
            if self.final.exists():
                raise ConfigError(f"--resume: '{self.final}' is a complete run — nothing to resume")
            if not self.partial.is_dir():
                raise ConfigError(f"--resume: no interrupted run at '{self.partial}' — give the "
                                  "--out folder of the run to continue")
        else:
            if self.final.exists():
                raise ConfigError(f"--out: '{self.final}' already exists — choose a new folder or remove it")
            if self.partial.exists():
                raise ConfigError(f"--out: an interrupted run is in '{self.partial}' — continue it "
                                  f"with `fedlora run --resume {self.final}`, or remove it")

    @property
    def tmp(self) -> Path:
        """The in-progress folder (older name of `partial`)."""
        return self.partial

    def open(self) -> "RunFolder":
        """Create `DIR.partial/` (fresh run) or take over the existing one (resume)."""
        if not self.resuming:
            try:
                self.partial.mkdir(parents=True, exist_ok=False)
            except FileExistsError:  # created since __init__ looked: two processes, one run
                raise ConfigError(f"'{self.partial}' was just created by another fedlora process "
                                  "making the same run — give each process its own runs "
                                  "(`fedlora sweep --shard I/N`) or wait for it") from None
        self._take_lock()
        for torn in self.partial.rglob(".*.tmp-*"):  # half-written by a killed process: never read
            torn.unlink(missing_ok=True)
        return self

    def path(self, name: str) -> Path:
        return self.partial / name

    def write_json(self, name: str, data: Any) -> None:
        self.path(name).write_text(json.dumps(_jsonable(data), indent=2) + "\n", encoding="utf-8")

    def write_text(self, name: str, text: str) -> None:
        self.path(name).write_text(text, encoding="utf-8")

    def append_jsonl(self, name: str, record: dict) -> None:
        with self.path(name).open("a", encoding="utf-8") as f:
            f.write(_jsonl_line(record))

    def write_jsonl(self, name: str, records: list[dict]) -> None:
        """Replace `name` with these records at once (a resumed run rewrites its metrics)."""
        atomic_write_bytes(self.path(name), "".join(map(_jsonl_line, records)).encode("utf-8"))

    def commit(self) -> Path:
        if self.final.exists():
            raise ConfigError(f"--out: '{self.final}' appeared while the run was going — "
                              f"the finished run is left in '{self.partial}'")
        self._release_lock()
        os.replace(self.partial, self.final)
        return self.final

    def abort(self, keep: bool = False) -> None:
        """Leave `DIR.partial/` for `--resume` (`keep`) or remove it."""
        self._release_lock()
        if not keep:
            shutil.rmtree(self.partial, ignore_errors=True)

    # one process at a time: a second `--resume` of the same folder would interleave writes
    def _take_lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        f = open(self.partial / ".lock", "w")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ConfigError(f"'{self.partial}' is in use by another fedlora process — wait for "
                              "it to finish or stop it") from None
        self._lock = f

    def _release_lock(self) -> None:
        if self._lock is not None:
            self._lock.close()
            self._lock = None
            (self.partial / ".lock").unlink(missing_ok=True)


def _jsonl_line(record: dict) -> str:
    return json.dumps(_jsonable(record)) + "\n"


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
