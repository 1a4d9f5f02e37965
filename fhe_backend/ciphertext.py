"""Ciphertexts on the wire: the client's encrypted activations and the provider's encrypted product.

Layout (all integers little-endian); see README.md for the byte-level table.

``Ciphertext``  (client -> provider), one block per N tokens:
    magic "CSX2" | params: 11 x u64 (a rounded upload: "CSX3", 12 x u64) | key_id: 8 B
    | tokens, d, first_row, blocks: 4 x u32
    | seeds: blocks x 32 B | B words of ceil(log_q/8) bytes (a rounded upload: exactly in_bits bits
      each, the field's last byte zero-padded): the full blocks, blocks-1 x d x N
      (row-major), then the last block's d x R, R = tokens - (blocks-1) N (its real tokens)

``MatmulResult`` (provider -> client):
    magic "CSY2" | params: 11 x u64 ("CSY3", 12 x u64, as the ciphertext) | key_id: 8 B
    | tokens, d_out, blocks: 3 x u32
    | default profile, out_bits_a + out_bits_b <= 64: one word A'' | B'' << out_bits_a of
      ceil((ka+kb)/8) bytes per value of the full blocks (blocks-1 x d_out x N), then of the last
      block's real tokens (d_out x R), then that block's other A'' words (d_out x (N-R), ka bits);
      wider: every A'' word (blocks x d_out x N), then the B'' words as the input's B words
    | shared-mask profile: seeds: blocks x 32 B | B'' words of ceil(out_bits_b/8) bytes, as the
      input's B words

Only the real tokens' B words travel: coefficient t of a decryption reads B''[t] and the whole of
A'' (a negacyclic product), so a padded token's B word is read by nobody; both sides hold zeros
there. A micro-batch shorter than N pays its own tokens in B, not N (A'' still travels whole).
Neither holds anything derived from the secret key but the ``key_id`` label, fresh per ciphertext
(``keys.fresh_label``: random bytes and an HMAC tag of them under the key's secret id, so requests
under one key cannot be linked by it); a result carries its ciphertext's label back.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidCiphertext, KeyMismatch, ParameterError, ShapeMismatch
from .packing import bit_bytes, pack_bits_into, pack_into, unpack, unpack_bits, unpack_pair, word_bytes
from .params import Params
from .sampling import SEED_BYTES

#: header layouts by magic, with their parameter words: "...2" carries the 11 parameters of an
#: unrounded upload, "...3" the 12 of a rounded one (Params.to_tuple), so unrounded payloads keep the
#: form that nodes predating rounded uploads read
Heads = dict[bytes, tuple[int, struct.Struct]]


def header_layouts(unrounded: bytes, rounded: bytes, tail: str) -> Heads:
    """Header layouts by magic: 4-byte magic, the parameter words (11, or all 12 of Params.FIELDS
    for a rounded upload), then ``tail`` (struct format of the other fields)."""
    words = len(Params.FIELDS)
    return {magic: (k, struct.Struct("<4s" + "Q" * k + tail)) for magic, k in ((unrounded, words - 1), (rounded, words))}


_CT_HEADS = header_layouts(b"CSX2", b"CSX3", "8sIIII")
_OUT_HEADS = header_layouts(b"CSY2", b"CSY3", "8sIII")
#: largest feature dimension and token count a ciphertext may declare (bounds parsing work)
MAX_DIM = 1 << 20
MAX_TOKENS = 1 << 24
#: bytes of a serialized result's fixed header, before its seeds and words, at most (12 parameters)
RESULT_HEAD_BYTES = max(head.size for _, head in _OUT_HEADS.values())


def head_of(heads: Heads, params: Params) -> tuple[bytes, struct.Struct]:
    """The magic and layout that carry ``params``: the one with as many parameter words."""
    words = len(params.to_tuple())
    return next((magic, head) for magic, (k, head) in heads.items() if k == words)


def read_head(heads: Heads, data: memoryview, what: str) -> tuple[Params, list[Any], int]:
    """The parameters, the other fields and the size of a header at the start of ``data``;
    InvalidCiphertext if its magic is unknown or the data too short."""
    found = heads.get(bytes(data[:4]))
    if found is None:
        raise InvalidCiphertext(f"not a {what} (bad magic)")
    k, head = found
    if len(data) < head.size:
        raise InvalidCiphertext(f"{what} truncated: {len(data)} bytes, header needs {head.size}")
    _, *rest = head.unpack_from(data)
    return _params_from(tuple(rest[:k])), rest[k:], head.size


def ciphertext_size(params: Params, tokens: int, features: int) -> int:
    """Bytes of a serialized Ciphertext of ``tokens`` x ``features``: its header, a seed per block,
    the real tokens' B words. A receiver knows it from a request's header, before the payload."""
    return head_of(_CT_HEADS, params)[1].size + -(-tokens // params.n) * SEED_BYTES + params.payload_bytes(tokens, features)


def result_size(params: Params, tokens: int, width: int) -> int:
    """Bytes of the serialized product of such a ciphertext by ``width`` output columns: known
    before anything is computed or allocated."""
    seeds = -(-tokens // params.n) * SEED_BYTES if params.shared_mask else 0
    return head_of(_OUT_HEADS, params)[1].size + seeds + params.result_bytes(tokens, width)


def _params_from(values: tuple[int, ...]) -> Params:
    try:
        return Params.from_tuple(values)
    except ParameterError as exc:
        raise InvalidCiphertext(f"ciphertext carries invalid parameters: {exc}") from exc


#: one packed field of a payload: (words, bits, high words or None, bit offset of the high words);
#: the offset EXACT packs the words at exactly ``bits`` bits each (packing.pack_bits_into)
Field = tuple[np.ndarray, int, "np.ndarray | None", int]
EXACT = -1


def _packed_bytes(count: int, bits: int, exact: bool) -> int:
    """Bytes of a field of ``count`` words: at exactly ``bits`` bits each, or in whole bytes."""
    return bit_bytes(bits, count) if exact else count * word_bytes(bits)


def _serialise(prefix: bytes, *fields: Field) -> bytes:
    """prefix followed by each field's packed words, assembled in one buffer: the payload is as large
    as the layer, so every intermediate bytes object would be another full copy."""
    sizes = [_packed_bytes(words.size, bits, shift == EXACT) for words, bits, _, shift in fields]
    buf = np.empty(len(prefix) + sum(sizes), dtype=np.uint8)
    buf[: len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    off = len(prefix)
    for (words, bits, high, shift), size in zip(fields, sizes):
        if size and shift == EXACT:
            pack_bits_into(buf[off : off + size], words, bits)
        elif size:  # the full blocks of a one-block payload: none
            pack_into(buf[off : off + size], words, bits, high, shift)
        off += size
    return buf.tobytes()


def last_block_tokens(tokens: int, blocks: int, n: int) -> int:
    """Real tokens of the last block, R in [1, N]: its B words that travel."""
    return tokens - (blocks - 1) * n


def _b_fields(words: np.ndarray, bits: int, r: int, *, exact: bool = False) -> list[Field]:
    """B words as they travel: the full blocks, then the last block's first ``r`` tokens; at
    exactly ``bits`` bits each if ``exact`` (a rounded upload), else in whole bytes."""
    shift = EXACT if exact else 64
    return [(words[:-1], bits, None, shift), (np.ascontiguousarray(words[-1, :, :r]), bits, None, shift)]


def _b_words(data: memoryview, bits: int, shape: tuple[int, int, int], r: int, *, exact: bool = False) -> np.ndarray:
    """Inverse of :func:`_b_fields`: (blocks, d, n) words, zero where nothing travelled."""
    blocks, d, n = shape
    words = (np.zeros if r < n else np.empty)(shape, dtype=np.int64)
    full = (blocks - 1) * d * n
    split = _packed_bytes(full, bits, exact)
    expected = split + _packed_bytes(d * r, bits, exact)
    if len(data) != expected:
        raise InvalidCiphertext(f"payload has {len(data)} bytes of words, expected {expected}")
    read = unpack_bits if exact else unpack
    if full:
        read(data[:split], bits, full, n, out=words[:-1].reshape(-1, n))
    read(data[split:], bits, d * r, r, out=words[-1, :, :r])
    return words


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
        magic, layout = head_of(_CT_HEADS, self.params)
        head = layout.pack(magic, *self.params.to_tuple(), self.key_id, self.tokens, self.d, self.first_row, self.blocks)
        r = last_block_tokens(self.tokens, self.blocks, self.params.n)
        return _serialise(head + b"".join(self.seeds), *_b_fields(self.words, self.params.in_bits, r, exact=self.params.rounded))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "Ciphertext":
        data = memoryview(data)
        params, rest, off = read_head(_CT_HEADS, data, "ciphertext")
        key_id, tokens, d, first_row, blocks = rest
        _check_dims(tokens, d, blocks, params.n)
        expected = off + blocks * SEED_BYTES + params.payload_bytes(tokens, d)
        if len(data) != expected:
            raise InvalidCiphertext(f"ciphertext has {len(data)} bytes, expected {expected}")
        seeds = tuple(bytes(data[off + i * SEED_BYTES : off + (i + 1) * SEED_BYTES]) for i in range(blocks))
        off += blocks * SEED_BYTES
        n = params.n
        words = _b_words(data[off:], params.in_bits, (blocks, d, n), last_block_tokens(tokens, blocks, n), exact=params.rounded)
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


class ResultWriter:
    """Serializes a product a block at a time, in :meth:`MatmulResult.to_bytes`'s layout (the module
    docstring), so that a provider can send each block once it is computed and hold one block's
    output, not the whole product's. ``block`` is called once per block, in order, with that block's
    words, and returns the bytes that follow (the first block's start with the result's header, in
    the same buffer: a layer-sized piece is not copied to prepend it). Every word takes whole
    bytes, so the layout's fields split at block boundaries. The one exception: a default-profile
    result too wide for joint words sends every A'' word before any B'' word, so its B'' words are
    held here until the last block."""

    def __init__(self, params: Params, key_id: bytes, tokens: int, d_out: int, seeds: tuple[bytes, ...] = ()) -> None:
        blocks = -(-tokens // params.n)
        _check_dims(tokens, d_out, blocks, params.n)
        shared = params.shared_mask
        if shared != bool(seeds) or (shared and len(seeds) != blocks):
            raise InvalidCiphertext("a shared-mask result carries one seed per block, a default-profile result none")
        self._p, self._blocks, self._r = params, blocks, last_block_tokens(tokens, blocks, params.n)
        self._done = 0
        self._held: list[Field] = []  # B'' words of a wide default-profile result, sent after every A''
        magic, layout = head_of(_OUT_HEADS, params)
        self._head = layout.pack(magic, *params.to_tuple(), key_id, tokens, d_out, blocks) + b"".join(seeds)

    def block(self, a: np.ndarray | None, b: np.ndarray) -> bytes:
        """The bytes of the next block, from its (d_out, n) words: A'' (None with a shared mask), B''."""
        if self._done == self._blocks:
            raise ShapeMismatch(f"all {self._blocks} blocks were written")
        p, r, head = self._p, self._r, self._head if self._done == 0 else b""
        self._done += 1
        last = self._done == self._blocks
        cut = (lambda words: np.ascontiguousarray(words[:, :r])) if last else (lambda words: words)
        if p.shared_mask:
            return _serialise(head, (cut(b), p.out_bits_b, None, 64))
        assert a is not None  # a default-profile block carries A''
        ka, kb = p.out_bits_a, p.out_bits_b
        if ka + kb <= 64:
            fields: list[Field] = [(cut(a), ka + kb, cut(b), ka)]
            if last and r < p.n:
                fields.append((np.ascontiguousarray(a[:, r:]), ka, None, 64))
            return _serialise(head, *fields)
        self._held.append((cut(b).copy(), kb, None, 64))
        return _serialise(head, (a, ka, None, 64), *(self._held if last else ()))


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
        return self.params.shared_mask

    @property
    def blocks(self) -> int:
        return self.b_words.shape[0]

    @property
    def d_out(self) -> int:
        return self.b_words.shape[1]

    def to_bytes(self) -> bytes:
        writer = ResultWriter(self.params, self.key_id, self.tokens, self.d_out, self.seeds)
        a = self.a_words
        return b"".join([writer.block(None if a is None else a[i], self.b_words[i]) for i in range(self.blocks)])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "MatmulResult":
        data = memoryview(data)
        p, rest, head_size = read_head(_OUT_HEADS, data, "matmul result")
        key_id, tokens, d_out, blocks = rest
        _check_dims(tokens, d_out, blocks, p.n)
        n = p.n
        count = blocks * d_out * n
        shape = (blocks, d_out, n)
        r = last_block_tokens(tokens, blocks, n)
        body = data[head_size:]
        ka, kb = p.out_bits_a, p.out_bits_b
        if p.shared_mask:
            if len(body) < blocks * SEED_BYTES:
                raise InvalidCiphertext("result truncated in its seeds")
            seeds = tuple(bytes(body[i * SEED_BYTES : (i + 1) * SEED_BYTES]) for i in range(blocks))
            b = _b_words(body[blocks * SEED_BYTES :], kb, shape, r)
            return cls(params=p, key_id=key_id, tokens=tokens, a_words=None, b_words=b, seeds=seeds)
        if ka + kb > 64:
            split = word_bytes(ka) * count
            if len(body) < split:
                raise InvalidCiphertext("result payload has the wrong length")
            a = unpack(body[:split], ka, count, n).reshape(shape)
            return cls(params=p, key_id=key_id, tokens=tokens, a_words=a, b_words=_b_words(body[split:], kb, shape, r))
        pair = word_bytes(ka + kb)
        full, last = (blocks - 1) * d_out * n, d_out * r
        if len(body) != (full + last) * pair + d_out * (n - r) * word_bytes(ka):
            raise InvalidCiphertext("result payload has the wrong length")
        a = np.empty(shape, dtype=np.int64)
        b = (np.zeros if r < n else np.empty)(shape, dtype=np.int64)
        if full:
            unpack_pair(body[: full * pair], ka + kb, full, n, ka, out=(a[:-1].reshape(-1, n), b[:-1].reshape(-1, n)))
        off = full * pair
        unpack_pair(body[off : off + last * pair], ka + kb, last, r, ka, out=(a[-1, :, :r], b[-1, :, :r]))
        if r < n:
            unpack(body[off + last * pair :], ka, d_out * (n - r), n - r, out=a[-1, :, r:])
        return cls(params=p, key_id=key_id, tokens=tokens, a_words=a, b_words=b)

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
