"""Randomness of the scheme: secrets, noise and seeded masks, all from a CSPRNG.

numpy's and torch's generators are not cryptographic and are never used here.

Mask expansion (the mapping every implementation must reproduce bit for bit):
    key      = the 32-byte block seed
    stream   = AES-256 in CTR mode under key, the 16-byte initial counter block being the
               big-endian integer ``first_row * n / 2`` (so row j's words start at counter j*n/2),
               encrypting zero bytes
    word i   = little-endian uint64 from stream bytes [8i, 8i+8)
    a[j][t]  = word (j*n + t) mod 2^log_q, for row (input feature) j and coefficient (token) t
Any contiguous range of rows is therefore one contiguous stretch of the stream, which a provider
holding only some contraction rows can expand directly.

Noise is a centred binomial with eta = 24: popcount of 24 random bits minus popcount of the next
24 bits of one 64-bit word of an AES-256-CTR stream under a fresh ``os.urandom`` key
(:func:`random_words`; the kernel that adds it is :func:`.kernels.finish_encrypt`).
"""

from __future__ import annotations

import os
import threading

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from .errors import ParameterError

SEED_BYTES = 32

_zeros_lock = threading.Lock()
_zeros = bytes(0)


def _zero_bytes(length: int) -> memoryview:
    """A read-only view of ``length`` zero bytes, shared to avoid re-allocating AES input."""
    global _zeros
    if len(_zeros) < length:
        with _zeros_lock:
            if len(_zeros) < length:
                _zeros = bytes(max(length, 2 * len(_zeros)))
    return memoryview(_zeros)[:length]


def aes_ctr_stream(key: bytes, counter: int, length: int, out: np.ndarray | None = None) -> np.ndarray:
    """``length`` bytes of AES-256-CTR keystream from 128-bit big-endian counter ``counter``.

    ``out``, if given, is a uint8 buffer of at least ``length + 15`` bytes (update_into wants a
    block's worth of slack) that receives the stream, so hot loops reuse one buffer per thread.
    """
    if len(key) != SEED_BYTES:
        raise ParameterError(f"seed must be {SEED_BYTES} bytes, got {len(key)}")
    enc = Cipher(algorithms.AES(key), modes.CTR(counter.to_bytes(16, "big"))).encryptor()
    buf = np.empty(length + 15, dtype=np.uint8) if out is None else out
    written = enc.update_into(_zero_bytes(length), buf)
    return buf[:written]


def expand_mask(seed: bytes, *, n: int, rows: int, first_row: int = 0, out: np.ndarray | None = None) -> np.ndarray:
    """Rows ``first_row .. first_row+rows-1`` of the mask A for one block, as raw int64 (rows, n) words.

    Only the low log_q bits are the mask; consumers read them mod 2^log_q (the fused kernels mask
    while they centre, which saves a pass). ``out``: optional buffer, as for :func:`aes_ctr_stream`.
    """
    if n % 2:
        raise ParameterError("ring degree must be even")
    return aes_ctr_stream(seed, first_row * n // 2, rows * n * 8, out).view("<i8").reshape(rows, n)


def random_words(rows: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) uint64 CSPRNG words: AES-256-CTR under a fresh os.urandom key."""
    return aes_ctr_stream(os.urandom(SEED_BYTES), 0, rows * n * 8, out).view("<u8").reshape(rows, n)


def fresh_seed() -> bytes:
    """A new block seed; never reused (a reused seed with the same key reveals m - m')."""
    return os.urandom(SEED_BYTES)


#: rows of ternary secrets expanded at a time (2n stream bytes and their ranks each)
_TERNARY_ROWS = 256


def expand_ternary(seed: bytes, *, n: int, rows: int, first_row: int = 0) -> np.ndarray:
    """Rows ``first_row .. first_row+rows-1`` of a matrix of uniform ternary secrets, (rows, n) int8,
    from a 32-byte secret seed. Row j owns bytes [2nj, 2n(j+1)) of the AES-256-CTR stream under the
    seed and keeps its first n bytes below 255 (b % 3 - 1: exactly uniform). Should fewer than n
    of its 2n bytes be below 255 (probability below 2^-1000 at n >= 64), the row goes on from its
    own stretch far beyond, at counter block 2^64 + j * 2^32. Any row range expands alone."""
    if n % 8:
        raise ParameterError("ring degree must be a multiple of 8")
    out = np.empty((rows, n), dtype=np.int8)
    chunk = 2 * n
    for r0 in range(0, rows, _TERNARY_ROWS):
        r1 = min(r0 + _TERNARY_ROWS, rows)
        b = aes_ctr_stream(seed, (first_row + r0) * chunk // 16, (r1 - r0) * chunk).reshape(r1 - r0, chunk)
        keep = b < 255
        rank = np.cumsum(keep, axis=1, dtype=np.int32)
        full = rank[:, -1] >= n
        if full.all():
            out[r0:r1] = (b[keep & (rank <= n)] % 3).astype(np.int8).reshape(r1 - r0, n) - 1
            continue
        for i in range(r1 - r0):
            kept = b[i][keep[i]][:n]
            counter = (1 << 64) + ((first_row + r0 + i) << 32)
            while kept.size < n:
                more = aes_ctr_stream(seed, counter, chunk)
                kept = np.concatenate([kept, more[more < 255]])[:n]
                counter += chunk // 16
            out[r0 + i] = (kept % 3).astype(np.int8) - 1
    return out


def ternary_secret(n: int) -> np.ndarray:
    """Uniform ternary secret in {-1, 0, 1}^n from os.urandom, by rejection of the byte 255."""
    out = np.empty(0, dtype=np.int64)
    while out.size < n:
        b = np.frombuffer(os.urandom(2 * n), dtype=np.uint8)
        b = b[b < 255]  # 255 = 3 * 85 values below: b % 3 is then exactly uniform
        out = np.concatenate([out, (b % 3).astype(np.int64) - 1])
    return out[:n]


