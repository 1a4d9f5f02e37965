"""Stream I/O shared by the provider and the client: cancel-safe writes, request and reply,
bounded reads and closing.

py-libp2p's stream I/O is not cancel-safe. Noise encrypts a message, using up a nonce, before the
socket send that a cancellation can skip, and a large yamux frame goes out as several Noise
messages: either way the peer's next decryption fails and the whole connection breaks, for every
stream on it (later dials fail with "No valid connections available"). Reads are not exempt, as a
yamux read may send a window update. Cancelling is routine here (a hedge's loser, a call redone
after a cheat, a BUSY reply that arrives mid-upload), so:

- `send_bytes`/`send_frame` write in pieces, each shielded from outside cancellation and bounded by
  the write's own deadline, and let a cancellation in only between pieces;
- the client never cancels an exchange's reads: it resets the exchange's stream instead
  (client/exchange.py);
- reads are timed out only where nothing can be in flight: a peer that sends nothing, or a message
  far below a yamux window (`read_to_end`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio
from libp2p.abc import INetStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH

from cipherswarm.protocol import DeadlineExceeded, Frame, Limits, Sealed, frame_prefix
from cipherswarm.protocol.stream import read_exactly, read_frame

from .errors import leaf_errors

CLOSE_TIMEOUT_S = 2.0
YAMUX_FRAME = 16 * MAX_PLAINTEXT_LENGTH
"""Bytes of a full yamux DATA frame, its 12-byte header included: 16 whole Noise messages, about
1 MiB (host.py sets yamux's frame size to it, and says why)."""
WRITE_PIECE = YAMUX_FRAME - 12
"""Bytes per shielded write: one full yamux frame, so a cancellation waits for at most that much
to go out, and the peer's reader takes (and credits back) a piece per read rather than per 64 KiB."""


async def send_bytes(stream: INetStream, data: bytes, *, timeout_s: float) -> None:
    """Write `data`, safely cancellable (module docstring); DeadlineExceeded after `timeout_s`."""
    deadline = trio.current_time() + timeout_s
    view = memoryview(data)
    for start in range(0, max(len(data), 1), WRITE_PIECE):
        await trio.lowlevel.checkpoint()  # a pending cancellation lands here, between pieces
        try:
            with trio.CancelScope(shield=True), trio.fail_at(deadline):
                await stream.write(bytes(view[start : start + WRITE_PIECE]))
        except trio.TooSlowError:
            raise DeadlineExceeded("write", timeout_s=timeout_s) from None


async def send_frame(stream: INetStream, sealed: Sealed, payload: bytes = b"", *, timeout_s: float) -> None:
    """protocol.stream.write_frame, made safe to cancel (module docstring)."""
    await send_bytes(stream, frame_prefix(sealed, payload) + payload, timeout_s=timeout_s)


async def read_to_end(stream: INetStream, *, limit: int, timeout_s: float) -> bytes:
    """Everything the peer writes before it closes the stream; ValueError past `limit` bytes,
    DeadlineExceeded after `timeout_s`. For small messages only: far below a yamux window, their
    reads send no window update, so timing them out cannot break the connection."""
    try:
        with trio.fail_after(timeout_s):
            data = await read_exactly(stream, limit + 1, read_timeout_s=math.inf)  # the whole read is bounded
    except trio.TooSlowError:
        raise DeadlineExceeded("read", timeout_s=timeout_s) from None
    if len(data) > limit:
        raise ValueError(f"more than {limit} bytes")
    return data


async def close_stream(stream: INetStream, *, reset: bool = False) -> None:
    """Close (or reset) `stream`, shielded from cancellation but bounded in time, ignoring its
    errors: it runs in `finally` blocks, after the exchange has already succeeded or failed, and a
    stream the peer already tore down raises on close."""
    with trio.CancelScope(shield=True), trio.move_on_after(CLOSE_TIMEOUT_S):
        try:
            await (stream.reset() if reset else stream.close())
        except Exception:  # noqa: BLE001  # see the docstring: the stream is gone either way
            pass


async def request_reply(
    stream: INetStream,
    sealed: Sealed,
    payload: bytes,
    *,
    limits: Limits,
    read_timeout_s: float,
    frame_timeout_s: float,
    on_sent: Callable[[], None] = lambda: None,
    on_reply: Callable[[], None] = lambda: None,
) -> Frame:
    """Send a request frame and read the reply frame, reading while still writing: a provider may
    answer BUSY before it reads the request (protocol README, "Exchange"), and then the rest of
    the payload need not be sent. `on_sent` is called once the whole request is written, `on_reply`
    once the reply's first bytes arrive. The one failure of the two directions is raised as itself."""

    async def send() -> None:
        await send_frame(stream, sealed, payload, timeout_s=frame_timeout_s)
        on_sent()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            reply = await read_frame(stream, limits=limits, read_timeout_s=read_timeout_s, frame_timeout_s=frame_timeout_s,
                                     on_first_bytes=on_reply)
            nursery.cancel_scope.cancel()  # a no-op unless the reply came early
    except BaseExceptionGroup as group:
        errors = leaf_errors(group)
        if len(errors) != 1:  # only cancellations (ours to propagate), or both directions failed
            raise
        raise errors[0] from None
    return reply
