"""The wire packing of k-bit words: byte-exact layout, round trips at every width, refusal of words
with bits above k wherever they sit, and thread chunks that never overwrite each other's bytes."""

from __future__ import annotations

import os

import numpy as np
import pytest

from cipherswarm.fhe_backend import packing
from cipherswarm.fhe_backend.errors import InvalidCiphertext


def _words(shape: tuple[int, ...], bits: int) -> np.ndarray:
    raw = np.frombuffer(os.urandom(8 * int(np.prod(shape))), dtype=np.uint64).reshape(shape)
    return (raw >> np.uint64(64 - bits)).view(np.int64) if bits < 64 else raw.view(np.int64)


def _reference(words: np.ndarray, bits: int) -> bytes:
    """The documented layout, written the slow obvious way: each word's low ceil(k/8) bytes, in order."""
    nb = packing.word_bytes(bits)
    return b"".join(int(w).to_bytes(8, "little", signed=True)[:nb] for w in words.reshape(-1))


def _packed(words: np.ndarray, bits: int, high: np.ndarray | None = None, shift: int = 64) -> bytes:
    out = np.empty(words.size * packing.word_bytes(bits), dtype=np.uint8)
    packing.pack_into(out, words, bits, high, shift)
    return out.tobytes()


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Chunks of a few rows, so that one call runs many thread tasks and chunk edges fall everywhere."""
    monkeypatch.setattr(packing, "CHUNK_WORDS", 16)
    monkeypatch.setenv("CIPHERSWARM_THREADS", "2")


@pytest.mark.parametrize("bits", [1, 7, 8, 9, 17, 24, 27, 37, 46, 55, 56, 57, 63, 64])
@pytest.mark.parametrize("n", [4, 8, 64])
def test_layout_and_round_trip(bits: int, n: int, small_chunks: None) -> None:
    words = _words((3, 5, n), bits)
    data = _packed(words, bits)
    assert data == _reference(words, bits)
    back = packing.unpack(data, bits, words.size, n)
    assert np.array_equal(back.reshape(words.shape), words)


def test_non_contiguous_rows_pack_like_their_copy(small_chunks: None) -> None:
    words = _words((2, 40, 16), 46)
    view = words[:, 7:29]  # a row chunk's view, as Ciphertext.select_rows makes
    assert _packed(view, 46) == _reference(np.ascontiguousarray(view), 46)


@pytest.mark.parametrize("ka,kb", [(37, 27), (20, 12), (1, 63), (30, 30)])
def test_joint_words_split_back(ka: int, kb: int, small_chunks: None) -> None:
    a, b = _words((2, 9, 32), ka), _words((2, 9, 32), kb)
    data = _packed(a, ka + kb, b, ka)
    assert data == _reference(a | (b << ka), ka + kb)
    a2, b2 = packing.unpack_pair(data, ka + kb, a.size, 32, ka)
    assert np.array_equal(a2.reshape(a.shape), a) and np.array_equal(b2.reshape(b.shape), b)


@pytest.mark.parametrize("bits", [9, 27, 46, 63])
def test_a_set_bit_above_k_is_refused_wherever_it_sits(bits: int, small_chunks: None) -> None:
    n, count = 16, 6 * 16
    data = bytearray(_packed(_words((6, n), bits), bits))
    nb = packing.word_bytes(bits)
    # first word, a word mid-chunk, and the last word of the payload (read byte by byte)
    for index in (0, count // 2 + 3, count - 1):
        bad = bytearray(data)
        bad[index * nb + nb - 1] |= 0x80
        with pytest.raises(InvalidCiphertext, match="exceeds"):
            packing.unpack(bytes(bad), bits, count, n)


def test_wrong_lengths_are_refused() -> None:
    data = _packed(_words((4, 8), 46), 46)
    with pytest.raises(InvalidCiphertext, match="expected"):
        packing.unpack(data[:-1], 46, 32, 8)
    with pytest.raises(InvalidCiphertext, match="rows"):
        packing.unpack(data, 46, 32, 12)
    with pytest.raises(ValueError, match="buffer"):
        packing.pack_into(np.empty(10, dtype=np.uint8), _words((4, 8), 46), 46)


def _bit_reference(words: np.ndarray, bits: int) -> bytes:
    """Exact bit packing, the slow obvious way: word i at bits [i k, (i+1) k) of one integer."""
    total = 0
    for i, w in enumerate(words.reshape(-1).tolist()):
        total |= (w % (1 << bits)) << (i * bits)
    return total.to_bytes(packing.bit_bytes(bits, words.size), "little")


@pytest.mark.parametrize("bits", [1, 7, 13, 31, 46, 52, 57, 63, 64])
@pytest.mark.parametrize("rows, n", [(1, 1), (3, 5), (40, 8), (17, 2048)])
def test_exact_bit_packing_layout_and_round_trip(bits: int, rows: int, n: int, small_chunks: None) -> None:
    """Several thread chunks (small_chunks) each start on a byte and never write a neighbour's."""
    words = _words((rows, n), bits)
    out = np.full(packing.bit_bytes(bits, words.size), 0xAA, dtype=np.uint8)  # stale bytes must not survive
    packing.pack_bits_into(out, words, bits)
    assert out.tobytes() == _bit_reference(words, bits)
    assert np.array_equal(packing.unpack_bits(out.tobytes(), bits, words.size, n), words)


def test_exact_bit_packing_refuses_wrong_lengths_and_set_padding_bits() -> None:
    words = _words((3, 5), 13)  # 195 bits: 5 padding bits in the last byte
    data = bytearray(_bit_reference(words, 13))
    with pytest.raises(InvalidCiphertext, match="expected"):
        packing.unpack_bits(bytes(data[:-1]), 13, words.size, 5)
    with pytest.raises(InvalidCiphertext, match="expected"):
        packing.unpack_bits(bytes(data) + b"\0", 13, words.size, 5)
    data[-1] |= 0x80  # a bit past the last word: a second encoding of the same words
    with pytest.raises(InvalidCiphertext, match="past its last word"):
        packing.unpack_bits(bytes(data), 13, words.size, 5)
