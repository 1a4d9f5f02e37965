"""Who may write a request to the client's uplink now: a few small ones at once, big ones in turn.

A home uplink moves one request's payload no faster for having company: two requests written at
once both arrive when two would have arrived one after the other, and the first provider starts
computing later than it could have. Writing several at once only hides per-request latency (a
stream to open, a round trip), which matters for small payloads alone. So a request is admitted
when nothing else is being written, or when fewer than `slots` are and the bytes being written,
its own included, stay within `window_bytes`; otherwise it waits, first come first served. Big
payloads (an 8B model's 117 MB blocks) then go one at a time at the link's full rate, each
arriving in a few seconds instead of all arriving together minutes later, and the first results
download while later chunks upload.

`UploadGate` is the decision alone, free of I/O and clocks, so that the real client (`Uploads`,
on trio) and the simulator (node/sim) run the same rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio


class UploadGate:
    """First-come-first-served admission of uploads by count and bytes in flight."""

    def __init__(self, slots: int, window_bytes: int) -> None:
        if slots < 1 or window_bytes < 0:
            raise ValueError("slots must be >= 1 and window_bytes >= 0")
        self.slots = slots
        self.window_bytes = window_bytes
        self.active = 0  # requests being written
        self.active_bytes = 0
        self._queue: deque[tuple[int, Callable[[], None]]] = deque()

    def _fits(self, nbytes: int) -> bool:
        return self.active == 0 or (self.active < self.slots and self.active_bytes + nbytes <= self.window_bytes)

    def request(self, nbytes: int, grant: Callable[[], None]) -> None:
        """Call `grant` once the upload of `nbytes` may start (now, or from a later `release`);
        the holder then calls `release(nbytes)` when its request is written."""
        self._queue.append((nbytes, grant))
        self._admit()

    def cancel(self, grant: Callable[[], None]) -> bool:
        """Withdraw a waiting request; False if it was already granted (then release it)."""
        for i, (_, g) in enumerate(self._queue):
            if g == grant:  # bound methods: equal, not identical, when taken twice
                del self._queue[i]
                self._admit()  # the requests behind it may fit now
                return True
        return False

    def release(self, nbytes: int) -> None:
        self.active -= 1
        self.active_bytes -= nbytes
        self._admit()

    def _admit(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            nbytes, grant = self._queue.popleft()
            self.active += 1
            self.active_bytes += nbytes
            grant()


class Uploads:
    """`UploadGate` for trio tasks: `take` waits (cancellably) for admission."""

    def __init__(self, slots: int, window_bytes: int) -> None:
        self.gate = UploadGate(slots, window_bytes)

    async def take(self, nbytes: int) -> None:
        """Wait until an upload of `nbytes` may start; the caller then owes `release(nbytes)`."""
        granted = trio.Event()
        self.gate.request(nbytes, granted.set)
        try:
            await granted.wait()
        except BaseException:
            if not self.gate.cancel(granted.set):  # admitted just as it was cancelled: give it back
                self.gate.release(nbytes)
            raise

    def release(self, nbytes: int) -> None:
        self.gate.release(nbytes)
