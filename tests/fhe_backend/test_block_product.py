"""A product computed and serialized a block at a time (BlockProduct, ResultWriter): the bytes a
provider streams are exactly the whole result's, in every profile and word layout."""

from __future__ import annotations

import pytest
import torch

from cipherswarm.fhe_backend import Ciphertext, MatmulResult, ShapeMismatch, get_backend
from cipherswarm.fhe_backend.ciphertext import ResultWriter
from cipherswarm.fhe_backend.evaluator import BlockProduct, matmul

be = get_backend("rlwe")


def streamed(ct: Ciphertext, w: torch.Tensor, *, transpose: bool = False) -> bytes:
    """The result as a streaming provider sends it: the head, then each block once computed."""
    product = BlockProduct(ct, w, transpose=transpose)
    writer = ResultWriter(ct.params, ct.key_id, ct.tokens, product.width, ct.seeds if product.shared else ())
    pieces = []
    for blk in range(ct.blocks):
        a, b = product.empty_block()
        product.block(blk, a, b)
        pieces.append(writer.block(a, b))
    return b"".join(pieces)


@pytest.mark.parametrize(
    ("profile", "x_bits", "w_max"),
    [("default", 8, 127), ("shared-mask", 8, 127), ("default", 14, 1023)],  # the last: A'' and B'' too wide for one word
)
@pytest.mark.parametrize("extra", [0, 300])  # whole blocks; a short last block
def test_a_product_streamed_block_by_block_is_the_whole_result_byte_for_byte(profile: str, x_bits: int, w_max: int,
                                                                              extra: int) -> None:
    gen = torch.Generator().manual_seed(x_bits + extra)
    w = torch.randint(-w_max, w_max + 1, (128, 24), generator=gen, dtype=torch.int16)
    params = be.params_for(w, x_bits, profile=profile)
    sk = be.keygen(params, weights=w) if profile == "shared-mask" else be.keygen(params)
    tokens = 2 * params.n + extra
    half = 1 << (x_bits - 1)
    x = torch.randint(-half, half, (tokens, 128), generator=gen)
    ct = be.encrypt(sk, x)
    if x_bits == 14:
        assert params.out_bits_a + params.out_bits_b > 64
    wire = streamed(ct, w)
    assert wire == matmul(ct, w).to_bytes()
    assert torch.equal(be.decrypt(sk, MatmulResult.from_bytes(wire)), x @ w.long())


def test_the_transposed_product_streams_too() -> None:
    w = torch.randint(-127, 128, (24, 128), dtype=torch.int16)
    sk = be.keygen(be.params_for(w, 8, transpose=True))
    x = torch.randint(-128, 128, (sk.params.n + 7, 128))
    ct = be.encrypt(sk, x)
    assert streamed(ct, w, transpose=True) == matmul(ct, w, transpose=True).to_bytes()


def test_a_writer_takes_no_block_beyond_the_last() -> None:
    w = torch.randint(-127, 128, (64, 8), dtype=torch.int16)
    sk = be.keygen(be.params_for(w, 8))
    ct = be.encrypt(sk, torch.randint(-128, 128, (5, 64)))
    product = BlockProduct(ct, w)
    writer = ResultWriter(ct.params, ct.key_id, ct.tokens, product.width)
    a, b = product.empty_block()
    product.block(0, a, b)
    writer.block(a, b)
    with pytest.raises(ShapeMismatch):
        writer.block(a, b)
