"""Row-chunked parallelism for the client's crypto.

The kernels, FFTs and AES release the GIL, so a small thread pool keeps both cores busy; each caller
picks the chunk size that suits its loop, and per-thread scratch buffers spare the loops their
allocations.
"""

from __future__ import annotations

import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import numpy as np

#: byte alignment of every scratch buffer: a cache line, and what FFTW's plans assume of their arrays
ALIGN = 64
_pool: ThreadPoolExecutor | None = None


def workers() -> int:
    """Threads used for crypto: CIPHERSWARM_THREADS, else every core this process may use."""
    env = os.environ.get("CIPHERSWARM_THREADS")
    if env:
        return max(1, int(env))
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))


def for_row_chunks(total: int, fn: Callable[[int, int], None], rows: int) -> None:
    """Call ``fn(start, stop)`` over ``[0, total)`` in chunks, in parallel; re-raise the first error."""
    global _pool
    spans = [(i, min(i + rows, total)) for i in range(0, total, rows)]
    if workers() == 1 or len(spans) == 1:
        for a, b in spans:
            fn(a, b)
        return
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=workers(), thread_name_prefix="cipherswarm-crypto")
    spent = 0.0
    for fut in [_pool.submit(_timed, fn, a, b) for a, b in spans]:
        spent += fut.result()
    _helped.seconds = helper_seconds() + spent


_helped = threading.local()


def _timed(fn: Callable[[int, int], None], start: int, stop: int) -> float:
    """Pool thread: ``fn(start, stop)`` and the CPU seconds it took this thread."""
    t0 = time.thread_time()
    fn(start, stop)
    return time.thread_time() - t0


def helper_seconds() -> float:
    """CPU seconds the pool's threads have spent on chunks the calling thread handed them, so far:
    ``time.thread_time`` of a caller misses them, and its crypto would otherwise go unnamed."""
    return getattr(_helped, "seconds", 0.0)


_scratch = threading.local()


def aligned_empty(shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """np.empty, starting on an ALIGN-byte boundary."""
    size = math.prod(shape) * np.dtype(dtype).itemsize
    raw = np.empty(size + ALIGN, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start : start + size].view(dtype).reshape(shape)


def scratch(name: str, shape: tuple[int, ...], dtype: np.dtype | type) -> np.ndarray:
    """A per-thread buffer named ``name``, viewed as ``shape`` and ``dtype``, reused across calls: the
    crypto's hot loops would otherwise allocate (and page-fault in) a few MB per chunk. Contents are
    garbage; callers fill it. One ALIGN-aligned allocation per name (the largest asked for), and its
    views are cached too, since building a view costs microseconds and the loops ask thousands of times."""
    views = _scratch.__dict__.setdefault(name, {})
    view = views.get((shape, dtype))
    if view is None:
        size = math.prod(shape) * np.dtype(dtype).itemsize
        flat = views.get("flat")
        if flat is None or flat.size < size:
            views.clear()
            flat = views["flat"] = aligned_empty((size,), np.uint8)
        view = views[(shape, dtype)] = flat[:size].view(dtype).reshape(shape)
    return view
