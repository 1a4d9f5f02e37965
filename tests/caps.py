"""Caps of slow tests whose work runs in the test's own process (trio tests use `trio.fail_after`,
tests of subprocesses their `timeout`). Importable from every test folder as `caps`."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Iterator


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """The cap of a slow test whose work runs in this process (trio.fail_after's role for sync code):
    the block fails with TimeoutError after ``seconds``. SIGALRM, so the main thread, on Unix."""
    def expired(signum: int, frame: object) -> None:
        raise TimeoutError(f"over the test's cap of {seconds:g} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
