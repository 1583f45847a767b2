"""Timing helper shared by the benchmarks: median wall time of a jitted call, compile excluded."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import jax


def median_seconds(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 2) -> float:
    """Median wall time of ``fn()`` (blocked until ready) over ``repeats`` runs after warm-up."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)
