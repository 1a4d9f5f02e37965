"""The allocator policy the cipherswarm command sets: glibc must accept both thresholds."""

from __future__ import annotations

import platform

from cipherswarm.fhe_backend.allocator import retain_freed_memory


def test_glibc_accepts_the_thresholds() -> None:
    # mallopt returns 0 for a value it refuses (e.g. a threshold above what this glibc allows)
    assert retain_freed_memory() is (platform.libc_ver()[0] == "glibc")
