"""Ciphertexts on the wire: the client's encrypted activations and the provider's encrypted product.

Layout (all integers little-endian); see README.md for the byte-level table.

``Ciphertext``  (client -> provider), one block per N tokens:
    magic "CSX1" | params: 11 x u64 | key_id: 8 B | tokens, d, first_row, blocks: 4 x u32
    | seeds: blocks x 32 B | B words: blocks x d x N words of ceil(log_q/8) bytes (row-major)

``MatmulResult`` (provider -> client):
    magic "CSY1" | params: 11 x u64 | key_id: 8 B | tokens, d_out, blocks: 3 x u32
    | default profile: blocks x d_out x N values; when out_bits_a + out_bits_b <= 64 each value is
      one word A'' | B'' << out_bits_a of ceil((ka+kb)/8) bytes, otherwise all A'' then all B'' words
    | shared-mask profile: seeds: blocks x 32 B | B'' words of ceil(out_bits_b/8) bytes

Neither holds anything derived from the secret key but the public random ``key_id`` label.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import numpy as np

from .errors import InvalidCiphertext, KeyMismatch, ParameterError, ShapeMismatch
from .packing import pack_into, unpack, unpack_pair, word_bytes
from .params import SHARED_MASK, Params
from .sampling import SEED_BYTES

_PARAMS = struct.Struct("<" + "Q" * len(Params.FIELDS))
_CT_HEAD = struct.Struct("<4s" + _PARAMS.format[1:] + "8sIIII")
_OUT_HEAD = struct.Struct("<4s" + _PARAMS.format[1:] + "8sIII")
CT_MAGIC = b"CSX1"
OUT_MAGIC = b"CSY1"
#: largest feature dimension and token count a ciphertext may declare (bounds parsing work)
MAX_DIM = 1 << 20
MAX_TOKENS = 1 << 24


def _params_from(values: tuple[int, ...]) -> Params:
    try:
        return Params.from_tuple(values)
    except ParameterError as exc:
        raise InvalidCiphertext(f"ciphertext carries invalid parameters: {exc}") from exc


#: one packed field of a payload: (words, bits, high words or None, bit offset of the high words)
Field = tuple[np.ndarray, int, "np.ndarray | None", int]


def _serialise(prefix: bytes, *fields: Field) -> bytes:
    """prefix followed by each field's packed words, assembled in one buffer: the payload is as large
    as the layer, so every intermediate bytes object would be another full copy."""
    sizes = [words.size * word_bytes(bits) for words, bits, _, _ in fields]
    buf = np.empty(len(prefix) + sum(sizes), dtype=np.uint8)
    buf[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    off = len(prefix)
    for (words, bits, high, shift), size in zip(fields, sizes):
        pack_into(buf[off : off + size], words, bits, high, shift)
        off += size
    return buf.tobytes()


def _check_dims(tokens: int, d: int, blocks: int, n: int) -> None:
    if not 1 <= tokens <= MAX_TOKENS or not 1 <= d <= MAX_DIM:
        raise InvalidCiphertext(f"dimensions out of range: tokens={tokens}, d={d}")
    if blocks != -(-tokens // n):
        raise InvalidCiphertext(f"{tokens} tokens need {-(-tokens // n)} blocks of {n}, header says {blocks}")


@dataclass(frozen=True, eq=False)
class Ciphertext:
    """Encrypted activations: ``blocks`` RLWE ciphertexts, one polynomial per feature per block."""

    params: Params
    key_id: bytes
    tokens: int  # real tokens; the last block is padded with zero rows
    first_row: int  # index of row 0 among the layer's contraction rows (for row chunks)
    seeds: tuple[bytes, ...]  # one fresh 32-byte mask seed per block
    words: np.ndarray  # (blocks, d, n) int64 in [0, q)

    def __post_init__(self) -> None:
        n = self.params.n
        if self.words.ndim != 3 or self.words.shape[2] != n or self.words.dtype != np.int64:
            raise InvalidCiphertext(f"words must be int64 (blocks, d, {n}), got {self.words.dtype} {self.words.shape}")
        _check_dims(self.tokens, self.d, self.blocks, n)
        if len(self.seeds) != self.blocks or any(len(s) != SEED_BYTES for s in self.seeds):
            raise InvalidCiphertext("one 32-byte seed per block is required")
        if not 0 <= self.first_row < MAX_DIM:
            raise InvalidCiphertext("first_row out of range")

    @property
    def blocks(self) -> int:
        return self.words.shape[0]

    @property
    def d(self) -> int:
        return self.words.shape[1]

    def to_bytes(self) -> bytes:
        head = _CT_HEAD.pack(CT_MAGIC, *self.params.to_tuple(), self.key_id, self.tokens, self.d, self.first_row, self.blocks)
        return _serialise(head + b"".join(self.seeds), (self.words, self.params.log_q, None, 64))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Ciphertext":
        data = memoryview(data)
        if len(data) < _CT_HEAD.size:
            raise InvalidCiphertext(f"ciphertext truncated: {len(data)} bytes, header needs {_CT_HEAD.size}")
        magic, *rest = _CT_HEAD.unpack_from(data)
        if magic != CT_MAGIC:
            raise InvalidCiphertext("not a ciphertext (bad magic)")
        params = _params_from(tuple(rest[: len(Params.FIELDS)]))
        key_id, tokens, d, first_row, blocks = rest[len(Params.FIELDS) :]
        _check_dims(tokens, d, blocks, params.n)
        off = _CT_HEAD.size
        body = blocks * d * params.n * word_bytes(params.log_q)
        if len(data) != off + blocks * SEED_BYTES + body:
            raise InvalidCiphertext(f"ciphertext has {len(data)} bytes, expected {off + blocks * SEED_BYTES + body}")
        seeds = tuple(bytes(data[off + i * SEED_BYTES : off + (i + 1) * SEED_BYTES]) for i in range(blocks))
        off += blocks * SEED_BYTES
        words = unpack(data[off:], params.log_q, blocks * d * params.n, params.n).reshape(blocks, d, params.n)
        return cls(params=params, key_id=key_id, tokens=tokens, first_row=first_row, seeds=seeds, words=words)

    # -- chunking: every split is exact, because everything is linear mod q -----------------------

    def select_blocks(self, start: int, stop: int) -> "Ciphertext":
        """Token blocks ``start:stop`` (for different providers); results join with ``concat_blocks``."""
        if not 0 <= start < stop <= self.blocks:
            raise ShapeMismatch(f"block range {start}:{stop} outside 0:{self.blocks}")
        n = self.params.n
        tokens = min(self.tokens - start * n, (stop - start) * n)
        return Ciphertext(self.params, self.key_id, tokens, self.first_row, self.seeds[start:stop], self.words[start:stop])

    def select_rows(self, start: int, stop: int, *, parts: int) -> "Ciphertext":
        """Contraction rows ``start:stop`` for a provider holding ``w[start:stop]``; ``parts`` is the
        number of row chunks the client will add, which sets the output modulus that stays exact."""
        if not 0 <= start < stop <= self.d:
            raise ShapeMismatch(f"row range {start}:{stop} outside 0:{self.d}")
        params = self.params.with_row_parts(parts)
        return Ciphertext(params, self.key_id, self.tokens, self.first_row + start, self.seeds, self.words[:, start:stop])


@dataclass(frozen=True, eq=False)
class MatmulResult:
    """Encrypted product: per block and output column, (A'', B'') rounded to the output bits.

    In the shared-mask profile only B'' travels back, with the block seeds (the client re-expands
    the block's single mask from them; a tampered seed only decrypts to garbage, which Freivalds
    catches).
    """

    params: Params
    key_id: bytes
    tokens: int
    a_words: np.ndarray | None  # (blocks, d_out, n) int64 in [0, 2^out_bits_a); None for shared mask
    b_words: np.ndarray  # (blocks, d_out, n) int64 in [0, 2^out_bits_b)
    seeds: tuple[bytes, ...] = ()  # shared mask: the block seeds; default profile: empty

    def __post_init__(self) -> None:
        n = self.params.n
        b = self.b_words
        if b.ndim != 3 or b.shape[2] != n or b.dtype != np.int64:
            raise InvalidCiphertext(f"b_words must be int64 (blocks, d_out, {n})")
        if self.shared_mask:
            if self.a_words is not None or len(self.seeds) != self.blocks or any(len(x) != SEED_BYTES for x in self.seeds):
                raise InvalidCiphertext("a shared-mask result carries B'' and one 32-byte seed per block, no A''")
        elif self.a_words is None or self.a_words.shape != b.shape or self.a_words.dtype != np.int64 or self.seeds:
            raise InvalidCiphertext("a default-profile result carries A'' and B'' of one shape, no seeds")
        _check_dims(self.tokens, self.d_out, self.blocks, n)

    @property
    def shared_mask(self) -> bool:
        return self.params.profile == SHARED_MASK

    @property
    def blocks(self) -> int:
        return self.b_words.shape[0]

    @property
    def d_out(self) -> int:
        return self.b_words.shape[1]

    def to_bytes(self) -> bytes:
        p = self.params
        head = _OUT_HEAD.pack(OUT_MAGIC, *p.to_tuple(), self.key_id, self.tokens, self.d_out, self.blocks)
        if self.shared_mask:
            return _serialise(head + b"".join(self.seeds), (self.b_words, p.out_bits_b, None, 64))
        if p.out_bits_a + p.out_bits_b <= 64:
            return _serialise(head, (self.a_words, p.out_bits_a + p.out_bits_b, self.b_words, p.out_bits_a))
        return _serialise(head, (self.a_words, p.out_bits_a, None, 64), (self.b_words, p.out_bits_b, None, 64))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "MatmulResult":
        data = memoryview(data)
        if len(data) < _OUT_HEAD.size:
            raise InvalidCiphertext(f"result truncated: {len(data)} bytes, header needs {_OUT_HEAD.size}")
        magic, *rest = _OUT_HEAD.unpack_from(data)
        if magic != OUT_MAGIC:
            raise InvalidCiphertext("not a matmul result (bad magic)")
        p = _params_from(tuple(rest[: len(Params.FIELDS)]))
        key_id, tokens, d_out, blocks = rest[len(Params.FIELDS) :]
        _check_dims(tokens, d_out, blocks, p.n)
        count = blocks * d_out * p.n
        shape = (blocks, d_out, p.n)
        body = data[_OUT_HEAD.size :]
        ka, kb = p.out_bits_a, p.out_bits_b
        if p.profile == SHARED_MASK:
            if len(body) < blocks * SEED_BYTES:
                raise InvalidCiphertext("result truncated in its seeds")
            seeds = tuple(bytes(body[i * SEED_BYTES : (i + 1) * SEED_BYTES]) for i in range(blocks))
            b = unpack(body[blocks * SEED_BYTES :], kb, count, p.n)
            return cls(params=p, key_id=key_id, tokens=tokens, a_words=None, b_words=b.reshape(shape), seeds=seeds)
        if ka + kb <= 64:
            a, b = unpack_pair(body, ka + kb, count, p.n, ka)
        else:
            split = word_bytes(ka) * count
            if len(body) != split + word_bytes(kb) * count:
                raise InvalidCiphertext("result payload has the wrong length")
            a, b = unpack(body[:split], ka, count, p.n), unpack(body[split:], kb, count, p.n)
        return cls(params=p, key_id=key_id, tokens=tokens, a_words=a.reshape(shape), b_words=b.reshape(shape))

    # -- re-aggregation of chunks ------------------------------------------------------------------

    @staticmethod
    def _same(parts: list["MatmulResult"], *, same_blocks: bool) -> "MatmulResult":
        if not parts:
            raise ShapeMismatch("nothing to aggregate")
        first = parts[0]
        for r in parts[1:]:
            if r.key_id != first.key_id:
                raise KeyMismatch("chunks were encrypted under different keys")
            if r.params != first.params:
                raise ShapeMismatch("chunks have different parameters")
            if same_blocks and r.seeds != first.seeds:
                raise ShapeMismatch("chunks come from different encryptions")
        return first

    @staticmethod
    def _join(arrays: list[np.ndarray | None], axis: int) -> np.ndarray | None:
        return None if arrays[0] is None else np.concatenate(arrays, axis=axis)

    @classmethod
    def concat_blocks(cls, parts: list["MatmulResult"]) -> "MatmulResult":
        """Join results of consecutive token-block chunks (in order)."""
        first = cls._same(parts, same_blocks=False)
        if any(r.d_out != first.d_out for r in parts):
            raise ShapeMismatch("block chunks have different output widths")
        if any(r.tokens != r.blocks * first.params.n for r in parts[:-1]):
            raise ShapeMismatch("only the last block chunk may be partial")
        return cls(first.params, first.key_id, sum(r.tokens for r in parts),
                   cls._join([r.a_words for r in parts], 0), np.concatenate([r.b_words for r in parts]),
                   sum((r.seeds for r in parts), ()))

    @classmethod
    def concat_columns(cls, parts: list["MatmulResult"]) -> "MatmulResult":
        """Join results for consecutive output-column slices of the weights (in order)."""
        first = cls._same(parts, same_blocks=True)
        if any(r.tokens != first.tokens for r in parts):
            raise ShapeMismatch("column chunks cover different tokens")
        return cls(first.params, first.key_id, first.tokens, cls._join([r.a_words for r in parts], 1),
                   np.concatenate([r.b_words for r in parts], axis=1), first.seeds)

    @classmethod
    def add(cls, parts: list["MatmulResult"]) -> "MatmulResult":
        """Sum partial products of contraction-row chunks (mod the output moduli)."""
        first = cls._same(parts, same_blocks=True)
        p = first.params
        if len(parts) > p.row_parts:
            raise ShapeMismatch(f"parameters admit {p.row_parts} row chunks, got {len(parts)}")
        if any(r.b_words.shape != first.b_words.shape or r.tokens != first.tokens for r in parts):
            raise ShapeMismatch("row chunks have different shapes")

        def total(arrays: list[np.ndarray], bits: int) -> np.ndarray:
            return sum(arrays[1:], arrays[0].copy()) & ((1 << bits) - 1 if bits < 64 else -1)

        a = None if first.a_words is None else total([r.a_words for r in parts], p.out_bits_a)
        return cls(p, first.key_id, first.tokens, a, total([r.b_words for r in parts], p.out_bits_b), first.seeds)
