"""Frames over a libp2p stream, under trio deadlines: the only module of the package that uses trio.

Works with any object that has `async read(n) -> bytes` and `async write(data)`, as libp2p's
INetStream does. `read(n)` may return fewer than n bytes, so reads loop; end of stream is b"" or
an EOFError (libp2p's StreamEOF is one). Other transport errors (a reset stream) propagate as they
are: they are the connection's failure, not the peer's protocol error.

Two deadlines bound a read: `read_timeout_s` for each call to `read` (a stalled peer) and
`frame_timeout_s` for the whole frame (a peer trickling bytes just fast enough). Either raises
DeadlineExceeded.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import trio

from .envelope import Sealed
from .errors import DeadlineExceeded
from .framing import Frame, FrameParser, Limits, frame_prefix

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
