"""Stream helpers shared by the provider and the client: bounded closing, request and reply."""

from __future__ import annotations

import trio
from libp2p.abc import INetStream

from cipherswarm.protocol import Frame, Limits, Sealed
from cipherswarm.protocol.stream import read_frame, write_frame

from .errors import leaf_errors

CLOSE_TIMEOUT_S = 2.0


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
            nursery.start_soon(lambda: write_frame(stream, sealed, payload, timeout_s=frame_timeout_s))
            reply = await read_frame(stream, limits=limits, read_timeout_s=read_timeout_s, frame_timeout_s=frame_timeout_s)
            nursery.cancel_scope.cancel()  # a no-op unless the reply came early
    except BaseExceptionGroup as group:
        errors = leaf_errors(group)
        if len(errors) != 1:  # only cancellations (ours to propagate), or both directions failed
            raise
        raise errors[0] from None
    return reply
