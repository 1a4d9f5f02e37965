"""Frames: uvarint(header length) || header || payload, read with hard limits.

The parser is sans-I/O (`FrameParser` says how many bytes it wants next and is fed them), so the
same code drives a blocking `read_exactly` here (`read_frame_sync`) and a libp2p stream under trio
deadlines in the node (node/streams.py, `read_frame`). Every size a peer
declares is checked against the receiver's `Limits` before a byte of it is read or allocated: a peer
cannot make the reader hold more than max_header_size + max_payload_size bytes per frame.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Generator
from dataclasses import dataclass

from .envelope import Header, Sealed, decode_header
from .errors import FrameTooLarge, MalformedFrame, TruncatedFrame
from .messages import payload_length
from .varint import encode_uvarint, uvarint_reader

MAX_HEADER_SIZE = 64 * 1024
"""Largest header any receiver must accept and any sender may send (version 1). Engine material
larger than this (evaluation keys, say) belongs in the payload."""


DEFAULT_MAX_PAYLOAD_SIZE = 512 << 20
"""The payload limit a provider advertises unless told otherwise. One 4096-token block of
LLaMA-3-8B's widest contraction (14,336 features at 7 B per word, 411 MB) fits, so no call of such a
model has to be cut into contraction rows, each of which returns a full-size output through the
client's downlink. A provider holds up to (slots + queue) admitted requests of this size."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """A receiver's bounds on one frame."""

    max_payload_size: int  # bytes; a provider advertises its value as CapabilityAdvert.max_payload_size
    max_header_size: int = MAX_HEADER_SIZE  # bytes after the length prefix; at most MAX_HEADER_SIZE

    def __post_init__(self) -> None:
        if not 0 <= self.max_payload_size < 2**63:
            raise ValueError("max_payload_size must be in [0, 2**63)")
        if not 0 < self.max_header_size <= MAX_HEADER_SIZE:
            raise ValueError(f"max_header_size must be in [1, {MAX_HEADER_SIZE}]")


@dataclass(frozen=True, slots=True)
class Frame:
    """A frame as read: a decoded header, not yet verified, and its payload. A streamed reply (1.2)
    is read with the header of the ReplyTrailer frame that follows its payload, as `trailer`
    (exchange.verify_reply checks both); every other frame has none."""

    header: Header
    payload: bytes
    trailer: Header | None = None


def _frame_reader(limits: Limits) -> Generator[int, bytes, Frame]:
    """Yields how many bytes it needs next, is sent exactly that many, returns the Frame."""
    header_size = yield from uvarint_reader()
    if header_size > limits.max_header_size:
        raise FrameTooLarge(limits.max_header_size, header_size, what="header")
    header = decode_header((yield header_size))
    size = payload_length(header.message)
    if size > limits.max_payload_size:
        raise FrameTooLarge(limits.max_payload_size, size, what="payload")
    payload = (yield size) if size else b""
    return Frame(header, payload)


class FrameParser:
    """Sans-I/O parser of one frame: read `want` bytes, `feed` them, repeat until it returns the
    Frame. Raises FrameTooLarge or MalformedFrame as soon as the bytes so far are refused, and
    TruncatedFrame when fed fewer bytes than it wanted (the input ended)."""

    def __init__(self, limits: Limits) -> None:
        self._reader = _frame_reader(limits)
        self.want = next(self._reader)
        self.received = 0  # bytes of this frame fed so far

    def feed(self, data: bytes) -> Frame | None:
        if len(data) > self.want:
            raise ValueError(f"fed {len(data)} bytes where {self.want} were wanted")
        if len(data) < self.want:
            raise TruncatedFrame(expected_bytes=self.received + self.want, received_bytes=self.received + len(data))
        self.received += len(data)
        try:
            self.want = self._reader.send(data)
        except StopIteration as done:
            return done.value
        return None


def read_frame_sync(read_exactly: Callable[[int], bytes], *, limits: Limits) -> Frame:
    """Read one frame through `read_exactly(n)`, which returns n bytes, or fewer only at end of input
    (as `io.BufferedReader.read` does). TruncatedFrame if the input ends inside the frame."""
    parser = FrameParser(limits)
    while (frame := parser.feed(read_exactly(parser.want))) is None:
        pass
    return frame


def decode_frame(data: bytes, *, limits: Limits) -> Frame:
    """The one frame that `data` holds, with nothing after it."""
    stream = io.BytesIO(data)
    frame = read_frame_sync(stream.read, limits=limits)
    if stream.tell() != len(data):
        raise MalformedFrame(f"{len(data) - stream.tell()} bytes after the frame")
    return frame


def frame_head(sealed: Sealed) -> bytes:
    """Everything of a frame before its payload, whatever the payload: for a streamed reply, whose
    payload is written in pieces as it is computed."""
    if len(sealed.header) > MAX_HEADER_SIZE:
        raise ValueError(f"header of {len(sealed.header)} bytes exceeds {MAX_HEADER_SIZE}")
    return encode_uvarint(len(sealed.header)) + sealed.header


def frame_prefix(sealed: Sealed, payload: bytes = b"") -> bytes:
    """Everything of a frame before its payload; the payload follows as is, so that a large one is
    written without being copied. Checks that `payload` is the one the header declares."""
    if len(payload) != payload_length(sealed.message):
        raise ValueError(f"payload is {len(payload)} bytes, the header declares {payload_length(sealed.message)}")
    return frame_head(sealed)


def encode_frame(sealed: Sealed, payload: bytes = b"") -> bytes:
    return frame_prefix(sealed, payload) + payload
