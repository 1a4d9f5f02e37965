"""Unsigned varints as multiformats/unsigned-varint specifies them (the ones libp2p uses).

Little-endian base-128: seven value bits per byte, low groups first, the high bit set on every byte
but the last. Values are below 2**63, so at most 9 bytes; the encoding must be minimal (no trailing
0x00 group), which gives every value exactly one encoding.
"""

from __future__ import annotations

from collections.abc import Generator

from .errors import MalformedFrame

MAX_VARINT_BYTES = 9
MAX_VARINT_VALUE = 2**63 - 1


def encode_uvarint(value: int) -> bytes:
    if not 0 <= value <= MAX_VARINT_VALUE:
        raise ValueError(f"varint value must be in [0, 2**63), got {value}")
    out = bytearray()
    while True:
        group = value & 0x7F
        value >>= 7
        if value:
            out.append(group | 0x80)
        else:
            out.append(group)
            return bytes(out)


def uvarint_reader() -> Generator[int, bytes, int]:
    """Sans-I/O decoder: yields how many bytes it needs next (always 1), is sent them, returns the
    value. Reading one byte at a time never consumes bytes past the varint."""
    value = 0
    for index in range(MAX_VARINT_BYTES):
        byte = (yield 1)[0]
        value |= (byte & 0x7F) << (7 * index)
        if not byte & 0x80:
            if byte == 0 and index > 0:
                raise MalformedFrame("varint is not minimally encoded")
            return value
    raise MalformedFrame(f"varint longer than {MAX_VARINT_BYTES} bytes")
