"""Stream I/O shared by the provider and the client: cancel-safe frame writes, request and reply,
bounded closing.

py-libp2p's yamux writes are not cancel-safe: a yamux frame goes out as several Noise messages,
and a write cancelled between them leaves half a frame on the connection, after which every
stream on that connection fails ("No valid connections available"). Cancelling is routine here
(a hedge's loser, a call redone after a cheat, a BUSY reply that arrives mid-upload), so
`send_frame` writes in pieces, each shielded from outside cancellation, and lets a cancellation
in only between pieces. Each piece is still bounded by the frame's own deadline; a stalled peer's
connection may break then, but it was stalled anyway. Reads are cancel-safe (they drain a
per-stream buffer) and need no such care.
"""

from __future__ import annotations

import trio
from libp2p.abc import INetStream

from cipherswarm.protocol import DeadlineExceeded, Frame, Limits, Sealed, frame_prefix
from cipherswarm.protocol.stream import read_frame

from .errors import leaf_errors

CLOSE_TIMEOUT_S = 2.0
WRITE_PIECE = 256 * 1024
"""Bytes per shielded write: one default yamux window, so a piece is a few yamux frames and a
cancellation waits for at most that much to go out."""


async def send_frame(stream: INetStream, sealed: Sealed, payload: bytes = b"", *, timeout_s: float) -> None:
    """protocol.stream.write_frame, made safe to cancel (module docstring). DeadlineExceeded if the
    frame takes longer than `timeout_s`."""
    deadline = trio.current_time() + timeout_s
    prefix = frame_prefix(sealed, payload)
    view = memoryview(payload)
    pieces = [prefix + payload] if len(payload) <= WRITE_PIECE else [
        prefix, *(view[i : i + WRITE_PIECE] for i in range(0, len(payload), WRITE_PIECE))
    ]
    for piece in pieces:
        await trio.lowlevel.checkpoint()  # a pending cancellation lands here, between pieces
        try:
            with trio.CancelScope(shield=True), trio.fail_at(deadline):
                await stream.write(bytes(piece))
        except trio.TooSlowError:
            raise DeadlineExceeded("write", timeout_s=timeout_s) from None


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
) -> Frame:
    """Send a request frame and read the reply frame, reading while still writing: a provider may
    answer BUSY before it reads the request (protocol README, "Exchange"), and then the rest of
    the payload need not be sent. The one failure of the two directions is raised as itself."""
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: send_frame(stream, sealed, payload, timeout_s=frame_timeout_s))
            reply = await read_frame(stream, limits=limits, read_timeout_s=read_timeout_s, frame_timeout_s=frame_timeout_s)
            nursery.cancel_scope.cancel()  # a no-op unless the reply came early
    except BaseExceptionGroup as group:
        errors = leaf_errors(group)
        if len(errors) != 1:  # only cancellations (ours to propagate), or both directions failed
            raise
        raise errors[0] from None
    return reply
