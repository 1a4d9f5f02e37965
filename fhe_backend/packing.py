"""Compact little-endian packing of k-bit words: ceil(k/8) bytes per word, never 8.

Parsing refuses words with bits set above k, so a corrupted or forged payload is an error rather
than a silently different ciphertext.
"""

from __future__ import annotations

import numpy as np

from .errors import InvalidCiphertext


def word_bytes(bits: int) -> int:
    return (bits + 7) // 8


def pack(words: np.ndarray, bits: int) -> bytes:
    """Words (any shape, int64/uint64 holding values in [0, 2^bits)) -> packed bytes."""
    nb = word_bytes(bits)
    flat = np.ascontiguousarray(words).reshape(-1).view(np.uint8).reshape(-1, 8)
    return flat[:, :nb].tobytes()  # little-endian: the low nb bytes of each word


def unpack(data: bytes | memoryview, bits: int, count: int) -> np.ndarray:
    """Packed bytes -> int64 array of ``count`` words in [0, 2^bits); InvalidCiphertext if malformed."""
    nb = word_bytes(bits)
    if len(data) != nb * count:
        raise InvalidCiphertext(f"payload holds {len(data)} bytes, expected {nb * count} for {count} {bits}-bit words")
    buf = np.zeros((count, 8), dtype=np.uint8)
    buf[:, :nb] = np.frombuffer(data, dtype=np.uint8).reshape(count, nb)
    words = buf.view(np.uint64).reshape(count)
    if bits < 64 and count and int(words.max()) >> bits:
        raise InvalidCiphertext(f"payload word exceeds {bits} bits")
    return words.view(np.int64)
