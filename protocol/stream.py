"""Frames over a libp2p stream, under trio deadlines: the only module of the package that uses trio.

Works with any object that has `async read(n) -> bytes` and `async write(data)`, as libp2p's
INetStream does. `read(n)` may return fewer than n bytes, so reads loop; end of stream is b"" or
an EOFError (libp2p's StreamEOF is one). Other transport errors (a reset stream) propagate as they
are: they are the connection's failure, not the peer's protocol error.

Two deadlines bound a read: `read_timeout_s` for each call to `read` (a stalled peer) and
`frame_timeout_s` for the whole frame (a peer trickling bytes just fast enough). Either raises
DeadlineExceeded.

A provider reads a request in two steps instead, so that it can check the signed header before it
reads (or makes room for) the payload (README sections 2 and 8): `read_header` reads the length
prefix and the header under one short deadline, and `read_payload` reads the payload the header
declares at a minimum average rate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from .envelope import Header, Sealed, decode_header
from .errors import DeadlineExceeded, FrameTooLarge, PayloadTooLarge, TruncatedFrame
from .framing import Frame, FrameParser, Limits, frame_prefix
from .messages import payload_length
from .varint import uvarint_reader

READ_CHUNK = 1 << 20
"""Most bytes asked of one `read` call, so that a stream implementation that allocates its buffer
up front never allocates more than this ahead of the data."""


class ReadStream(Protocol):
    async def read(self, n: int) -> bytes: ...


class WriteStream(Protocol):
    async def write(self, data: bytes) -> None: ...


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
    the header) as soon as the payload length the header declares does; MalformedFrame; TruncatedFrame (`is_clean_close` if nothing came at all). The
    header is decoded, not verified."""
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


async def write_frame(stream: WriteStream, sealed: Sealed, payload: bytes = b"", *, timeout_s: float = 120.0) -> None:
    """Write one frame: prefix and header in one write, then the payload uncopied."""
    prefix = frame_prefix(sealed, payload)
    try:
        with trio.fail_after(timeout_s):
            await stream.write(prefix)
            if payload:
                await stream.write(payload)
    except trio.TooSlowError:
        raise DeadlineExceeded("write", timeout_s=timeout_s) from None
