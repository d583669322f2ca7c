"""Shared timing for the benchmarks: warm up, then the median of repeated wall-clock runs."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 0) -> float:
    """Median wall time (s) of `repeats` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class PairedTiming(NamedTuple):
    """Medians of two alternately timed functions and of their per-pair ratios a / b, with the ratios' range."""

    seconds_a: float
    seconds_b: float
    ratio: float
    ratio_min: float
    ratio_max: float


def paired_seconds(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int) -> PairedTiming:
    """Time `fn_a` and `fn_b` in alternation, `repeats` pairs.

    On a shared machine whose speed drifts by tens of percent over minutes, the two runs of a pair see
    the same speed, so the median pair ratio is steadier than the ratio of two separately taken medians.
    """
    times_a, times_b = [], []
    for _ in range(repeats):
        for fn, times in ((fn_a, times_a), (fn_b, times_b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times_a, times_b, strict=True)]
    return PairedTiming(
        statistics.median(times_a),
        statistics.median(times_b),
        statistics.median(ratios),
        min(ratios),
        max(ratios),
    )
