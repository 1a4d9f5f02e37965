"""Who may write a request to the client's uplink now: a few small ones at once, big ones in turn,
or side by side when one provider cannot take them as fast as the client's link sends.

A home uplink moves one request's payload no faster for having company: two requests written at
once both arrive when two would have arrived one after the other, and the first provider starts
computing later than it could have. Writing several at once only hides per-request latency (a
stream to open, a round trip), which matters for small payloads alone. So a request is admitted
when nothing else is being written, or when fewer than `slots` are and the bytes being written,
its own included, stay within `window_bytes`; otherwise it waits, first come first served. Big
payloads (an 8B model's 117 MB blocks) then go one at a time at the link's full rate, each
arriving in a few seconds instead of all arriving together minutes later, and the first results
download while later chunks upload.

A fast link is the exception: a client on 1 Gbit/s writing to providers that each take 300 Mbit/s
would leave two thirds of its link idle. When the user states the uplink's rate (`uplink_bps`),
the gate also admits big uploads side by side up to `uplink_bps / r`, r the measured rate of the
recent uploads (each release reports its bytes and seconds). The rule is stable: uploads that
share a saturated link each measure uplink/k, which admits the k already running and no more.

`UploadGate` is the decision alone, free of I/O and clocks, so that the real client (`Uploads`,
on trio) and the simulator (node/sim) run the same rule.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import trio


#: weight of the newest upload in the measured rate (an exponential moving average)
RATE_WEIGHT = 0.25


class UploadGate:
    """First-come-first-served admission of uploads by count, bytes in flight and, with a stated
    uplink rate, how much of it the uploads in flight can use (module docstring)."""

    def __init__(self, slots: int, window_bytes: int, uplink_bps: float = 0.0) -> None:
        if slots < 1 or window_bytes < 0 or uplink_bps < 0:
            raise ValueError("slots must be >= 1, window_bytes and uplink_bps >= 0")
        self.slots = slots
        self.window_bytes = window_bytes
        self.uplink_bps = uplink_bps  # the client's uplink in bytes/s as the user states it; 0: unknown
        self.rate_bps = 0.0  # measured bytes/s of one upload (moving average); 0: none measured yet
        self.active = 0  # requests being written
        self.active_bytes = 0
        self._queue: deque[tuple[int, Callable[[], None]]] = deque()

    @property
    def link_share(self) -> int:
        """Big uploads the link takes side by side: uplink / measured rate of one, at least 1."""
        if not self.uplink_bps or not self.rate_bps:
            return 1
        return max(1, int(self.uplink_bps / self.rate_bps))

    def _fits(self, nbytes: int) -> bool:
        if self.active == 0:
            return True
        return self.active < self.slots and (self.active_bytes + nbytes <= self.window_bytes or self.active < self.link_share)

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

    def release(self, nbytes: int, seconds: float = 0.0) -> None:
        """An admitted upload ended; `seconds` > 0: it was written whole in that time (a measurement)."""
        self.active -= 1
        self.active_bytes -= nbytes
        if seconds > 0 and nbytes > self.window_bytes:  # small ones measure latency, not the link
            rate = nbytes / seconds
            self.rate_bps = rate if not self.rate_bps else (1 - RATE_WEIGHT) * self.rate_bps + RATE_WEIGHT * rate
        self._admit()

    def _admit(self) -> None:
        while self._queue and self._fits(self._queue[0][0]):
            nbytes, grant = self._queue.popleft()
            self.active += 1
            self.active_bytes += nbytes
            grant()


class Uploads:
    """`UploadGate` for trio tasks: `take` waits (cancellably) for admission."""

    def __init__(self, slots: int, window_bytes: int, uplink_bps: float = 0.0) -> None:
        self.gate = UploadGate(slots, window_bytes, uplink_bps)

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

    def release(self, nbytes: int, seconds: float = 0.0) -> None:
        self.gate.release(nbytes, seconds)
