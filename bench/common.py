"""Shared helpers of the benchmark scripts: timing and a ratio table."""

from __future__ import annotations

import statistics
import time
from typing import Callable


def timed(fn: Callable[[], object], *, reps: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall seconds of ``fn`` over ``reps`` runs after ``warmup`` runs, and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def row(label: str, value: str, goal: str = "", met: bool | None = None) -> str:
    mark = "" if met is None else ("  met" if met else "  NOT met")
    return f"  {label:<58} {value:>16}   {goal}{mark}"
