"""Keep the crypto's layer-sized buffers mapped between calls (glibc processes).

Every encryption, decryption and payload allocates buffers as large as a layer's activations (tens
of MB). glibc serves allocations above its mmap threshold (adaptive, at most 32 MB) straight from
mmap and unmaps them on free, so the next layer faults every page in again: on the VMs we measured
that is about 2 us per 4 KiB page, and a 50 MB payload took 27 ms to allocate and copy instead of
3.7 ms. :func:`retain_freed_memory` serves large allocations from the heap and keeps freed heap
memory, so a process in its steady state reuses warm pages. The price is that the process keeps
its peak footprint, which a node sized for its largest layer has to budget anyway. Only processes
that own their allocator policy call it: the ``cipherswarm`` command and the benchmarks.
"""

from __future__ import annotations

import ctypes
import platform
from typing import Any

#: mallopt parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: allocations below this come from the heap; larger ones (none of a layer's) still get their own mmap
MMAP_THRESHOLD = 1 << 30
#: free memory at the heap's top is returned to the kernel only beyond this
TRIM_THRESHOLD = 1 << 31


def _glibc(name: str, *argtypes: type) -> Any:
    """glibc's function ``name`` with its argument types, or None where the C library is not glibc."""
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        fn = getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = argtypes
    return fn


def retain_freed_memory() -> bool:
    """Ask glibc to keep freed large buffers for reuse; False where the C library is not glibc."""
    mallopt = _glibc("mallopt", ctypes.c_int, ctypes.c_int)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def release_free_memory() -> bool:
    """Hand the C heap's free pages back to the kernel (glibc ``malloc_trim``); False elsewhere.

    Work that streams a checkpoint one layer at a time frees as much as it allocates, but glibc keeps
    freed chunks that small long-lived objects pin between them: loading a model's summaries grew a
    process by more than the model's weights before this was called after each layer."""
    trim = _glibc("malloc_trim", ctypes.c_size_t)
    return trim is not None and bool(trim(0))
