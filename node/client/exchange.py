"""One request and its reply on a fresh stream, as a task whose libp2p I/O is never cancelled.

Cancelling a py-libp2p write breaks the whole connection, not just the stream: Noise encrypts a
message (using up a nonce) before the socket send that a cancellation may skip, and the peer's
next decryption then fails (streams.py). Reads are no safer, because a yamux read sends a window
update. Yet a client cancels attempts all the time: the loser of a hedge, the chunks in flight
when a cheat is found, an attempt past its deadline.

So an attempt does no I/O itself. It starts an Exchange in the dispatcher's nursery and only waits
for it, which can be cancelled at any moment. The Exchange opens the stream, sends the request,
reads the reply, and after the attempt's verdict sends the countersigned receipt or nothing. It
is never cancelled from outside; to stop it early (`abandon`, or its deadline) a watchdog resets
its stream, a write like any other but one made whole, after which the stream's reads and writes
fail at once and the Exchange ends. The attempt learns of the deadline from the watchdog at once,
even while libp2p is still opening the stream (to a frozen peer that takes libp2p's own 10 s).

Uploads take turns: an Exchange is admitted by the client's upload gate (uploads.py: big payloads
one at a time, a few small ones at once) before it opens its stream, and leaves it when its request
is written. On a home uplink, sending every chunk at once would only split the link so that all of
them arrive late, past the providers' frame deadlines; in turns, the first chunks arrive early and
their providers start computing while the rest are sent. The request is made and signed when the
Exchange is admitted, so its expiry counts from then, not from the queue. The deadline (and the
dispatcher's hedge clock, through `started`) counts from that moment too: time queued behind our
own uplink is not the provider's fault. It ends, and so does the hedge clock (through
`replying`), when the reply's first bytes arrive: from then on the reply is read at whatever rate
the links allow, each read bounded by its own timeout and the whole frame by its size at
MIN_REPLY_BPS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import trio
from libp2p.abc import INetStream
from libp2p.peer.id import ID

from cipherswarm.protocol import PROTOCOL_IDS, Frame, Limits, Sealed, SignedReceipt, seal

from ..host import NodeHost
from ..identity import signing_key
from ..streams import close_stream, request_reply, send_frame
from .uploads import Uploads

ACK_TIMEOUT_S = 5.0
MIN_REPLY_BPS = 1e6  # slowest reply transfer tolerated, bytes/s (8 Mbit/s)


async def wait_any(*events: trio.Event) -> None:
    """Return once any of `events` is set."""
    async with trio.open_nursery() as nursery:

        async def wait(event: trio.Event) -> None:
            await event.wait()
            nursery.cancel_scope.cancel()

        for event in events:
            nursery.start_soon(wait, event)


class ExchangeExpired(Exception):
    """The exchange passed its deadline before the reply arrived."""


class Exchange:
    """A request on its way to `peer` and the reply coming back; `run` is the task."""

    def __init__(
        self,
        node: NodeHost,
        peer: ID,
        request: Callable[[], Sealed],
        payload: bytes,
        *,
        limits: Limits,
        timeout_s: float,
        uploads: Uploads | None = None,
        started: trio.Event | None = None,
        replying: trio.Event | None = None,
        protocols: Sequence[str] = PROTOCOL_IDS,
    ) -> None:
        self._node = node
        self.peer = peer
        self._request = request  # makes and signs the request once the upload is admitted
        self.sealed: Sealed | None = None  # that request, once made
        self._payload = payload
        self._limits = limits
        self._timeout_s = timeout_s
        self._uploads = uploads
        self._holds_upload = False
        self.started = trio.Event() if started is None else started  # an upload slot is taken: the deadline runs from here
        self._replying = trio.Event() if replying is None else replying  # the reply's first bytes arrived: the deadline is met
        self._protocols = list(protocols)
        self._stream: INetStream | None = None
        self._reply: Frame | BaseException | None = None
        self._replied = trio.Event()
        self._receipt: SignedReceipt | None = None
        self._decided = trio.Event()  # acknowledge() or abandon()
        self._stop = trio.Event()  # abandon(): reset the stream now
        self._abandon_queue = trio.CancelScope()  # cancels the wait for an upload slot
        self._expired = False
        self.admitted_at = 0.0  # trio time the upload gate admitted it (the attempt's own clock starts)
        self.replied_at = 0.0  # trio time the reply's first bytes arrived (the deadline's end)

    async def reply(self) -> Frame:
        """The reply frame, not yet verified; raises what the exchange failed with (libp2p and
        protocol errors as they are, ExchangeExpired past the deadline)."""
        await self._replied.wait()
        if isinstance(self._reply, BaseException):
            raise self._reply
        assert self._reply is not None  # _replied is set only with a reply or an error
        return self._reply

    def acknowledge(self, receipt: SignedReceipt) -> None:
        """Send `receipt` (countersigned) back, then close the stream."""
        if not self._decided.is_set():
            self._receipt = receipt
            self._decided.set()

    def abandon(self) -> None:
        """Stop: reset the stream, send nothing more. A no-op once acknowledged."""
        if not self._decided.is_set():
            self._decided.set()
            self._stop.set()

    def _deliver(self, reply: Frame | BaseException) -> None:
        if not self._replied.is_set():
            self._reply = reply
            self._replied.set()

    async def run(self) -> None:
        """The exchange's task (start it in a nursery that outlives the attempt)."""
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._watchdog)
                await self._exchange()
                nursery.cancel_scope.cancel()  # only the watchdog is left to stop
        finally:
            self._deliver(ExchangeExpired() if self._expired else trio.ClosedResourceError("exchange ended"))
            if self._stream is not None:
                await close_stream(self._stream)

    def _reply_starts(self) -> None:
        self.replied_at = trio.current_time()
        self._replying.set()

    def _release_upload(self, seconds: float = 0.0) -> None:
        if self._holds_upload:
            self._holds_upload = False
            assert self._uploads is not None
            self._uploads.release(len(self._payload), seconds)

    def _upload_written(self) -> None:
        """The request is written whole: its time since admission measures the uplink (uploads.py)."""
        self._release_upload(trio.current_time() - self.admitted_at)

    async def _take_upload_slot(self) -> bool:
        """Wait for the upload gate (no deadline: the queue is our own uplink); False if abandoned."""
        if self._uploads is not None:
            with self._abandon_queue:
                await self._uploads.take(len(self._payload))
                self._holds_upload = True
            if self._abandon_queue.cancelled_caught:
                return False
        self.admitted_at = trio.current_time()
        self.started.set()
        return True

    async def _exchange(self) -> None:
        try:
            if not await self._take_upload_slot():
                return
            self.sealed = sealed = self._request()
            self._stream = await self._node.host.new_stream(self.peer, self._protocols)
            if self._stop.is_set() or self._expired:  # too late: the request would be stale work
                return
            # The watchdog enforces the deadline up to the reply's first bytes; after them, the
            # reads' own timeouts bound a stalled or trickling reply.
            slack = self._timeout_s + 1.0
            frame = await request_reply(
                self._stream, sealed, self._payload, limits=self._limits, read_timeout_s=slack,
                frame_timeout_s=slack + self._limits.max_payload_size / MIN_REPLY_BPS,
                on_sent=self._upload_written, on_reply=self._reply_starts,
            )
        except Exception as exc:  # handed to the attempt, which classifies it
            self._deliver(ExchangeExpired() if self._expired else exc)
            return
        finally:
            self._release_upload()
        self._deliver(frame)
        await self._decided.wait()
        if self._receipt is not None:
            try:
                with self._node.cpu.section("signatures"):
                    sealed = seal(self._receipt, signing_key(self._node.key_pair))
                await send_frame(self._stream, sealed, timeout_s=ACK_TIMEOUT_S)
            except Exception:  # noqa: BLE001  # the receipt is recorded either way; the ack is a courtesy
                pass

    async def _watchdog(self) -> None:
        await wait_any(self.started, self._stop)  # queued for an upload slot: no deadline yet
        if self._stop.is_set():
            self._abandon_queue.cancel()
        else:
            with trio.move_on_after(self._timeout_s):
                await wait_any(self._stop, self._replying)
            if self._replying.is_set():  # the reply is on its way: its reads time out by themselves
                await self._stop.wait()
        self._expired = not self._stop.is_set()
        self._decided.set()
        if self._expired:
            self._deliver(ExchangeExpired())
        if self._stream is not None:
            await close_stream(self._stream, reset=True)
