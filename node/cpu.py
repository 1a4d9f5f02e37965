"""The client's CPU, named: clocks of single threads, and the trio thread's time split by task.

A client process runs torch in the training thread (and torch's own OpenMP threads), the swarm in
one trio thread (Noise, yamux, framing, signatures, the ledger, scheduling) and the crypto in
worker threads. `time.process_time` sums them all, so a step's CPU can only be named part by part,
in the thread that spends it:

- worker threads time their own calls (`time.thread_time`, plus what the crypto pool spent for
  them, `fhe_backend.parallel.helper_seconds`): dispatch.thread_timed;
- the trio thread is split by `TrioMeter`, an instrument that books every task step to its task's
  kind and lets synchronous code book what it encloses to a part of its own (`section`); what trio
  spends outside task steps (epoll, rescheduling, the instrument itself) is its own part;
- the training thread and torch's threads are read with `thread_clock` around the trainer's own
  sections (trainer/quantization.py).

Nothing is derived from the others: whatever no part claims is reported as unnamed.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import trio

TRIO_SCHEDULER = "trio_scheduler"

# Task kinds by the prefix of the task's name (trio names a task by its function's qualified name).
# Checked in order, first match wins; anything else is the client's own logic ("client_tasks").
_KINDS: tuple[tuple[str, str], ...] = (
    ("libp2p.pubsub", "discovery"),
    ("libp2p.kad_dht", "discovery"),
    ("libp2p.tools", "discovery"),  # the services' runners (pubsub, gossipsub, DHT)
    ("cipherswarm.node.discovery", "discovery"),
    ("cipherswarm.node.host._fill_routing_table", "discovery"),
    ("cipherswarm.node.client.exchange", "streams"),  # a request written and its reply read
    ("libp2p.", "streams"),  # yamux's reader, the swarm's connection and stream tasks
)


def thread_clock(tid: int) -> float:
    """CPU seconds of thread `tid` (a native thread id) of this process, so far.

    Linux's per-thread CPU clock id, (~tid << 3) | 6 (CPUCLOCK_PERTHREAD | CPUCLOCK_SCHED): any
    thread of the process can be read, in about 2 us, not only the calling one."""
    return time.clock_gettime((~tid << 3) | 6)


def _is_trio_worker(tid: int) -> bool:
    """trio names its cached worker threads "Trio thread N" and starts them without `threading`."""
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().startswith("Trio thread")
    except OSError:  # ended meanwhile
        return True


def native_threads() -> list[int]:
    """Threads of this process that Python did not start: torch's OpenMP pool, BLAS threads.
    The training thread's torch ops run on them too. Not trio's worker threads: the client's
    crypto runs and is timed there. Empty where /proc is not available."""
    try:
        tids = {int(t) for t in os.listdir("/proc/self/task")}
    except OSError:
        return []
    python = {t.native_id for t in threading.enumerate() if t.native_id is not None}
    return sorted(t for t in tids - python if not _is_trio_worker(t))


class TrioMeter(trio.abc.Instrument):
    """CPU seconds of the trio thread by part; install with `trio.lowlevel.add_instrument`.

    Each task step is booked to its task's kind (_KINDS); `section(part)` books the synchronous code
    it encloses to `part` and takes it out of the enclosing step. Use `section` on the trio thread
    only (it keeps no lock). `seconds()` adds TRIO_SCHEDULER: the thread's CPU since `start()`
    that no task step took."""

    def __init__(self) -> None:
        self.parts: dict[str, float] = {}
        self._kinds: dict[str, str] = {}
        self._step0 = 0.0
        self._nested = 0.0
        self._started: float | None = None
        self._stepped = 0.0  # task steps and sections since start()

    def start(self) -> None:
        """Begin booking (on the trio thread, as the instrument is added)."""
        self._started = time.thread_time()

    def _add(self, part: str, seconds: float) -> None:
        self.parts[part] = self.parts.get(part, 0.0) + seconds

    @contextmanager
    def section(self, part: str) -> Iterator[None]:
        t0 = time.thread_time()
        try:
            yield
        finally:
            spent = time.thread_time() - t0
            self._add(part, spent)
            self._nested += spent

    def _kind(self, task: trio.lowlevel.Task) -> str:
        kind = self._kinds.get(task.name)
        if kind is None:
            kind = next((k for prefix, k in _KINDS if task.name.startswith(prefix)), "client_tasks")
            self._kinds[task.name] = kind
        return kind

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        self._nested = 0.0
        self._step0 = time.thread_time()

    def after_task_step(self, task: trio.lowlevel.Task) -> None:
        spent = time.thread_time() - self._step0
        self._stepped += spent
        self._add(self._kind(task), spent - self._nested)

    def seconds(self) -> dict[str, float]:
        """Cumulative seconds by part, TRIO_SCHEDULER included (call on the trio thread)."""
        out = dict(self.parts)
        if self._started is not None:
            out[TRIO_SCHEDULER] = time.thread_time() - self._started - self._stepped
        return out
