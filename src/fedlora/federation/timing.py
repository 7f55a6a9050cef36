"""Optional wall-clock instrumentation of a run, for `benchmarks/round_breakdown.py`.

The round loop, the in-process transport and the local trainer accept a `timings` dict; each
phase adds its seconds under its name. With `timings=None` (the default everywhere) nothing is
recorded, and timing never changes what is computed.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator

Timings = dict[str, float]


class Laps:
    """A stopwatch over consecutive phases: `lap(name)` adds the seconds since the previous
    lap (or since creation) to `timings[name]`. Does nothing when `timings` is None."""

    def __init__(self, timings: Timings | None):
        self.timings = timings
        self.last = time.perf_counter() if timings is not None else 0.0

    def __call__(self, name: str) -> None:
        if self.timings is None:
            return
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self.last
        self.last = now


@contextmanager
def phase(timings: Timings | None, name: str) -> Iterator[None]:
    """Add the seconds spent in the `with` block to `timings[name]` (nothing if None)."""
    if timings is None:
        yield
        return
    start = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
