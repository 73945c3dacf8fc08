"""Wall-clock helpers shared by the benchmarks (host timers; the timed callables must block)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def timed(fn: Callable[[], object]) -> float:
    """Seconds of one call of ``fn``."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def throughput(fn: Callable[[], object], batch: int, min_seconds: float) -> float:
    """Volumes per second of ``fn`` (one call = ``batch`` volumes): the median call time of calls
    repeated for at least ``min_seconds`` (and at least twice), after one warm-up call."""
    fn()
    times: list[float] = []
    while len(times) < 2 or sum(times) < min_seconds:
        times.append(timed(fn))
    return batch / statistics.median(times)
