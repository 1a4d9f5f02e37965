"""Stream I/O shared by the provider and the client: frames read under deadlines and hard limits,
cancel-safe writes, request and reply, and closing. The wire format itself (what a frame is, its
limits, its checks) is the protocol's, sans-I/O (cipherswarm.protocol); this module is what moves
its bytes over libp2p streams under trio.

Reads work on any object with `async read(n) -> bytes`, as libp2p's INetStream has. `read(n)` may
return fewer than n bytes, so reads loop; end of stream is b"" or an EOFError (libp2p's StreamEOF
is one). Other transport errors (a reset stream) propagate as they are: they are the connection's
failure, not the peer's protocol error. Two deadlines bound a frame's read: `read_timeout_s` for
each call to `read` (a stalled peer) and `frame_timeout_s` for the whole frame (a peer trickling
bytes just fast enough); either raises DeadlineExceeded. A provider reads a request in two steps
instead, so that it can check the signed header before it reads (or makes room for) the payload
(protocol README sections 2 and 8): `read_header` reads the length prefix and the header under one
short deadline, and `read_payload` reads the payload the header declares at a minimum average rate.

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
from dataclasses import dataclass
from typing import Protocol

import trio
from libp2p.abc import INetStream
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH

from cipherswarm.protocol import (
    DeadlineExceeded,
    Frame,
    FrameParser,
    FrameTooLarge,
    Header,
    Limits,
    MatmulReply,
    PayloadTooLarge,
    Sealed,
    TruncatedFrame,
    decode_header,
    frame_prefix,
)
from cipherswarm.protocol.messages import payload_length
from cipherswarm.protocol.varint import uvarint_reader

from .errors import leaf_errors

READ_CHUNK = 1 << 20
"""Most bytes asked of one `read` call, so that a stream implementation that allocates its buffer
up front never allocates more than this ahead of the data."""


class ReadStream(Protocol):
    async def read(self, n: int) -> bytes: ...


async def read_exactly(stream: ReadStream, n: int, read_timeout_s: float) -> bytes:
    """n bytes, or fewer if the stream ends first."""
    chunks: list[bytes] = []
    received = 0
    while received < n:
        try:
            with trio.fail_after(read_timeout_s):
                chunk = await stream.read(min(n - received, READ_CHUNK))
        except trio.TooSlowError:
            raise DeadlineExceeded("read", timeout_s=read_timeout_s) from None
        except EOFError:
            break
        if not chunk:
            break
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)  # no copy when one read returned everything


async def read_frame(
    stream: ReadStream,
    *,
    limits: Limits,
    read_timeout_s: float = 10.0,
    frame_timeout_s: float = 120.0,
    on_first_bytes: Callable[[], None] = lambda: None,
) -> Frame:
    """Read one frame. Raises FrameTooLarge, MalformedFrame, TruncatedFrame (`is_clean_close` if
    the peer closed between frames) or DeadlineExceeded. The frame is not verified yet.
    `on_first_bytes` is called once the frame's first bytes have arrived."""
    parser = FrameParser(limits)
    try:
        with trio.fail_after(frame_timeout_s):
            frame = parser.feed(await read_exactly(stream, parser.want, read_timeout_s))
            on_first_bytes()
            while frame is None:
                frame = parser.feed(await read_exactly(stream, parser.want, read_timeout_s))
    except trio.TooSlowError:
        raise DeadlineExceeded("frame", timeout_s=frame_timeout_s) from None
    return frame


@dataclass(frozen=True, slots=True)
class FrameHead:
    """A frame's header as read by read_header, not verified yet; its payload is still unread."""

    header: Header
    head_bytes: int  # bytes read: the length prefix and the header
    payload_length: int  # bytes the header declares, within the reader's limit


async def read_header(stream: ReadStream, *, limits: Limits, timeout_s: float) -> FrameHead:
    """Read the length prefix and the header of a frame, all within `timeout_s` (a peer trickling
    its header, or stalling, gets DeadlineExceeded("header") after that long), and not a byte of the
    payload. Raises FrameTooLarge as soon as the prefix exceeds `limits`, PayloadTooLarge (carrying
    the header) as soon as the payload length the header declares does; MalformedFrame;
    TruncatedFrame (`is_clean_close` if nothing came at all). The header is decoded, not verified."""
    received = 0

    async def take(n: int) -> bytes:
        nonlocal received
        data = await read_exactly(stream, n, math.inf)  # the whole header is bounded below
        if len(data) < n:
            raise TruncatedFrame(expected_bytes=received + n, received_bytes=received + len(data))
        received += n
        return data

    try:
        with trio.fail_after(timeout_s):
            varint = uvarint_reader()
            want = next(varint)
            try:
                while True:
                    want = varint.send(await take(want))
            except StopIteration as done:
                header_size: int = done.value
            if header_size > limits.max_header_size:
                raise FrameTooLarge(limits.max_header_size, header_size, what="header")
            header = decode_header(await take(header_size))
    except trio.TooSlowError:
        raise DeadlineExceeded("header", timeout_s=timeout_s) from None
    size = payload_length(header.message)
    if size > limits.max_payload_size:
        raise PayloadTooLarge(limits.max_payload_size, size, header=header)
    return FrameHead(header, received, size)


async def read_payload(
    stream: ReadStream,
    head: FrameHead,
    *,
    min_rate: float,
    grace_s: float,
    read_timeout_s: float = 10.0,
    start: float | None = None,
    not_after: float = math.inf,
) -> bytes:
    """Read the payload that `head` declares, `size` bytes, at no less than `min_rate` bytes per
    second on average: its i-th byte must have arrived by `start + grace_s + i / min_rate` (checked
    a chunk of at most READ_CHUNK bytes at a time), `start` being trio's clock now unless given. A
    peer that falls behind, or is still sending at `not_after` (trio time), gets
    DeadlineExceeded("payload"); one that stalls for `read_timeout_s` in one read,
    DeadlineExceeded("read"). TruncatedFrame if the stream ends first. Memory follows the bytes
    received, read in chunks, until they are joined at the end."""
    if min_rate <= 0:
        raise ValueError("min_rate must be positive")
    size = head.payload_length
    start = trio.current_time() if start is None else start
    allowed_s = max(0.0, min(grace_s + size / min_rate, not_after - start))
    chunks: list[bytes] = []
    received = 0
    while received < size:
        want = min(size - received, READ_CHUNK)
        due = min(start + grace_s + (received + want) / min_rate, not_after)
        stalled = trio.current_time() + read_timeout_s
        try:
            with trio.fail_at(min(due, stalled)):
                chunk = await stream.read(want)
        except trio.TooSlowError:
            if stalled < due:
                raise DeadlineExceeded("read", timeout_s=read_timeout_s) from None
            raise DeadlineExceeded("payload", timeout_s=allowed_s) from None
        except EOFError:
            chunk = b""
        if not chunk:
            raise TruncatedFrame(expected_bytes=head.head_bytes + size, received_bytes=head.head_bytes + received)
        chunks.append(chunk)
        received += len(chunk)
    return b"".join(chunks)


TRAILER_LIMITS = Limits(max_payload_size=0)
"""A streamed reply's trailer: a header alone."""
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
    """Write one frame (`frame_prefix`, then the payload), safely cancellable (module docstring);
    DeadlineExceeded after `timeout_s`."""
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
    the payload need not be sent. A streamed reply (1.2) is read with its trailer (`Frame.trailer`),
    under the same deadlines. `on_sent` is called once the whole request is written, `on_reply`
    once the reply's first bytes arrive. The one failure of the two directions is raised as itself."""

    async def send() -> None:
        await send_frame(stream, sealed, payload, timeout_s=frame_timeout_s)
        on_sent()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            reply = await read_frame(stream, limits=limits, read_timeout_s=read_timeout_s, frame_timeout_s=frame_timeout_s,
                                     on_first_bytes=on_reply)
            if isinstance(reply.header.message, MatmulReply) and reply.header.message.streamed:
                trailer = await read_frame(stream, limits=TRAILER_LIMITS, read_timeout_s=read_timeout_s,
                                           frame_timeout_s=read_timeout_s)
                reply = Frame(reply.header, reply.payload, trailer=trailer.header)
            nursery.cancel_scope.cancel()  # a no-op unless the reply came early
    except BaseExceptionGroup as group:
        errors = leaf_errors(group)
        if len(errors) != 1:  # only cancellations (ours to propagate), or both directions failed
            raise
        raise errors[0] from None
    return reply
