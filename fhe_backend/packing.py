"""Compact little-endian packing of k-bit words: ceil(k/8) bytes per word, never 8 unless k > 56.

A word of ``nb`` bytes moves as one unaligned 64-bit load or store (numba), on every core: this is
the client's serialisation of every ciphertext it sends and every result it receives, as large as
the layer itself, so a byte-by-byte numpy pass (about 20 ns per word here) would cost more than the
encryption. Parsing refuses words with bits set above k, so a corrupted or forged payload is an
error rather than a silently different ciphertext.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from .errors import InvalidCiphertext
from .parallel import for_row_chunks

#: words per thread task: a few MB of payload, large enough that dispatch costs nothing
CHUNK_WORDS = 1 << 18


def word_bytes(bits: int) -> int:
    return (bits + 7) // 8


@intrinsic
def _load_u64(typingctx, buf, pos):
    """The 8 bytes of a uint8 array at byte ``pos``, as a little-endian uint64 (no alignment)."""
    if not isinstance(buf, types.Array) or buf.dtype != types.uint8:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
        return builder.load(ptr, align=1)

    return types.uint64(buf, pos), codegen


@intrinsic
def _store_u64(typingctx, buf, pos, value):
    """Write ``value`` as 8 little-endian bytes of a uint8 array at byte ``pos`` (no alignment)."""
    if not isinstance(buf, types.Array) or buf.dtype != types.uint8:
        return None

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        ptr = builder.bitcast(builder.gep(data, [args[1]]), ir.IntType(64).as_pointer())
        builder.store(args[2], ptr, align=1)
        return context.get_dummy_value()

    return types.void(buf, pos, types.uint64), codegen


@njit(cache=True, nogil=True)
def _pack_rows(lo, hi, shift, nb, r0, r1, out):
    """out[(r n + t) nb : +nb] = low nb bytes of lo[r, t] | hi[r, t] << shift, rows r0..r1-1.

    lo, hi: (rows, n) int64 views (hi may be lo with shift 64 meaning "none"). Each word is one
    8-byte store whose extra bytes the next word overwrites; the chunk's last words, whose stores
    would spill into a neighbour's bytes, go byte by byte.
    """
    n = lo.shape[1]
    end = r1 * n * nb
    for r in range(r0, r1):
        pos = r * n * nb
        for t in range(n):
            w = np.uint64(lo[r, t])
            if shift < 64:
                w |= np.uint64(hi[r, t]) << np.uint64(shift)
            if pos + 8 <= end:
                _store_u64(out, pos, w)
            else:
                for k in range(nb):
                    out[pos + k] = np.uint8((w >> np.uint64(8 * k)) & np.uint64(0xFF))
            pos += nb


@njit(cache=True, nogil=True)
def _unpack_rows(data, nb, bits, split, r0, r1, lo, hi):
    """Inverse of :func:`_pack_rows`: lo[r, t] = word & (2^split - 1), hi[r, t] = word >> split
    (split = bits: no hi). Returns whether any word had bits set at or above ``bits``. Reads never
    pass the chunk's last byte (the final words are read byte by byte)."""
    n = lo.shape[1]
    end = r1 * n * nb
    keep = np.uint64(0xFFFFFFFFFFFFFFFF) if nb == 8 else (np.uint64(1) << np.uint64(8 * nb)) - np.uint64(1)
    low = np.uint64(0xFFFFFFFFFFFFFFFF) if split == 64 else (np.uint64(1) << np.uint64(split)) - np.uint64(1)
    over = np.uint64(0)
    for r in range(r0, r1):
        pos = r * n * nb
        for t in range(n):
            if pos + 8 <= end:
                w = _load_u64(data, pos) & keep
            else:
                w = np.uint64(0)
                for k in range(nb):
                    w |= np.uint64(data[pos + k]) << np.uint64(8 * k)
            if bits < 64:
                over |= w >> np.uint64(bits)
            lo[r, t] = np.int64(w & low)
            if split < bits:
                hi[r, t] = np.int64(w >> np.uint64(split))
            pos += nb
    return over != 0


def _rows(words: np.ndarray) -> np.ndarray:
    """A (rows, n) view of (..., n) words; copies only a non-contiguous slice (a row chunk's view)."""
    return words.reshape(-1, words.shape[-1])


def pack_into(out: np.ndarray, words: np.ndarray, bits: int, high: np.ndarray | None = None, high_shift: int = 64) -> None:
    """Write ``words`` (..., n) int64 in [0, 2^bits) into ``out`` (uint8, exactly count * nb bytes).

    With ``high``, each word is ``words | high << high_shift`` (a joint word of two fields).
    """
    nb = word_bytes(bits)
    lo = _rows(words)
    hi = lo if high is None else _rows(high)
    if out.dtype != np.uint8 or out.ndim != 1 or out.size != lo.size * nb:
        raise ValueError(f"pack buffer must be {lo.size * nb} uint8 bytes")
    per = max(1, CHUNK_WORDS // lo.shape[1])
    for_row_chunks(lo.shape[0], lambda r0, r1: _pack_rows(lo, hi, high_shift if high is not None else 64, nb, r0, r1, out), rows=per)


def _unpack(data: bytes | memoryview, bits: int, count: int, n: int, split: int,
            out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    nb = word_bytes(bits)
    if len(data) != nb * count:
        raise InvalidCiphertext(f"payload holds {len(data)} bytes, expected {nb * count} for {count} {bits}-bit words")
    if count % n:
        raise InvalidCiphertext(f"{count} words do not fill rows of {n}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if out is not None:  # writable (count // n, n) int64 views, e.g. into a larger array
        lo, hi = out
    else:
        lo = np.empty((count // n, n), dtype=np.int64)
        hi = lo if split == bits else np.empty_like(lo)
    over: list[bool] = []
    per = max(1, CHUNK_WORDS // n)
    for_row_chunks(lo.shape[0], lambda r0, r1: over.append(_unpack_rows(buf, nb, bits, split, r0, r1, lo, hi)), rows=per)
    if any(over):
        raise InvalidCiphertext(f"payload word exceeds {bits} bits")
    return lo, hi


def unpack(data: bytes | memoryview, bits: int, count: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """Packed bytes -> (count // n, n) int64 words in [0, 2^bits), written into ``out`` if given
    (a writable view of that shape).

    InvalidCiphertext if the length is wrong or any word has bits set above ``bits``.
    """
    return _unpack(data, bits, count, n, bits, None if out is None else (out, out))[0]


def unpack_pair(data: bytes | memoryview, bits: int, count: int, n: int, split: int,
                out: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Packed joint words -> (word mod 2^split, word >> split), each (count // n, n) int64, written
    into the views ``out`` if given; errors as :func:`unpack`."""
    return _unpack(data, bits, count, n, split, out)


# -- bit-exact packing: k bits per word, for the rounded uploads (params.py) -------------------------


def bit_bytes(bits: int, count: int) -> int:
    """Bytes of ``count`` words packed at exactly ``bits`` bits each, the last byte zero-padded."""
    return (bits * count + 7) // 8


@njit(cache=True, nogil=True)
def _pack_bits_rows(words, bits, r0, r1, out):
    """Words of rows r0..r1-1 of (rows, n) ``words`` at ``bits`` bits each, little-endian, from bit
    r0 n bits of ``out`` (a whole byte: n bits is a multiple of 8 for the callers' row counts).
    Whole 64-bit groups are stored as they fill, the rest byte by byte, so nothing is written
    past the rows' own bytes (another thread writes the next rows)."""
    n = words.shape[1]
    pos = (r0 * n * bits) // 8
    acc = np.uint64(0)
    held = 0  # bits in acc
    for r in range(r0, r1):
        for t in range(n):
            w = np.uint64(words[r, t])
            if held == 0:
                acc = w
            else:
                acc |= w << np.uint64(held)
            if held + bits >= 64:
                _store_u64(out, pos, acc)
                pos += 8
                acc = (w >> np.uint64(64 - held)) if held > 0 else np.uint64(0)
                held = held + bits - 64
            else:
                held += bits
    while held > 0:
        out[pos] = np.uint8(acc & np.uint64(0xFF))
        acc >>= np.uint64(8)
        pos += 1
        held -= 8


@njit(cache=True, nogil=True)
def _unpack_bits_rows(data, bits, r0, r1, out):
    """Inverse of :func:`_pack_bits_rows` for rows r0..r1-1 of ``out`` (reads only)."""
    n = out.shape[1]
    size = data.shape[0]
    mask = np.uint64(0xFFFFFFFFFFFFFFFF) if bits == 64 else (np.uint64(1) << np.uint64(bits)) - np.uint64(1)
    bit = r0 * n * bits
    for r in range(r0, r1):
        for t in range(n):
            byte, off = bit >> 3, bit & 7
            if byte + 8 <= size:
                x = _load_u64(data, byte)
            else:
                x = np.uint64(0)
                for k in range(size - byte):
                    x |= np.uint64(data[byte + k]) << np.uint64(8 * k)
            v = x >> np.uint64(off)
            if off + bits > 64:
                v |= np.uint64(data[byte + 8]) << np.uint64(64 - off)
            out[r, t] = np.int64(v & mask)
            bit += bits


def _bit_rows(rows: int, n: int) -> int:
    """Rows per thread task: whole bytes at each task's start (8 rows hold a multiple of 8 bits)."""
    return max(8, CHUNK_WORDS // n // 8 * 8)


def pack_bits_into(out: np.ndarray, words: np.ndarray, bits: int) -> None:
    """Write ``words`` (..., n) int64 in [0, 2^bits) into ``out`` (uint8, exactly bit_bytes(bits,
    count) bytes) at ``bits`` bits each, the last byte's unused bits zero."""
    rows = _rows(words)
    if out.dtype != np.uint8 or out.ndim != 1 or out.size != bit_bytes(bits, rows.size):
        raise ValueError(f"pack buffer must be {bit_bytes(bits, rows.size)} uint8 bytes")
    if not rows.size:
        return
    for_row_chunks(rows.shape[0], lambda r0, r1: _pack_bits_rows(rows, bits, r0, r1, out), rows=_bit_rows(*rows.shape))


def unpack_bits(data: bytes | memoryview, bits: int, count: int, n: int, out: np.ndarray | None = None) -> np.ndarray:
    """Bit-packed bytes -> (count // n, n) int64 words in [0, 2^bits), into ``out`` if given.
    InvalidCiphertext if the length is wrong or the padding bits of the last byte are not zero
    (one encoding per payload)."""
    if len(data) != bit_bytes(bits, count):
        raise InvalidCiphertext(f"payload holds {len(data)} bytes, expected {bit_bytes(bits, count)} for {count} {bits}-bit words")
    if count % n:
        raise InvalidCiphertext(f"{count} words do not fill rows of {n}")
    buf = np.frombuffer(data, dtype=np.uint8)
    spare = 8 * len(data) - bits * count
    if spare and int(buf[-1]) >> (8 - spare):
        raise InvalidCiphertext("payload has bits set past its last word")
    lo = np.empty((count // n, n), dtype=np.int64) if out is None else out
    if count:
        for_row_chunks(lo.shape[0], lambda r0, r1: _unpack_bits_rows(buf, bits, r0, r1, lo), rows=_bit_rows(*lo.shape))
    return lo
