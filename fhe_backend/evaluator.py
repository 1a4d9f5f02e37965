"""Provider side: multiply encrypted activations by clear integer weights. No key is involved.

For each block the provider expands the mask A from its seed and computes A' = A @ W and
B' = B @ W (mod q), by default as float64 GEMMs on signed limbs: a limb of ``limb_bits`` bits times
a weight column with L1 norm ``l1`` stays below 2^53 when ``limb_bits - 1 + bitlen(l1) <= 52``, so
BLAS is exact. The limb products are recombined mod q and rounded to the output bits (modulus switch).
On a GPU the same product runs as int8 GEMMs on 8-bit limbs (method="int8", int8_limbs.py).

Memory: a provider holds its layers as int8 and nothing else per weight, so the product works on
tiles of ``rows`` contraction rows by ``cols`` output columns (:func:`plan_tiles`). Per tile it
expands those rows of the mask, splits them into limbs, converts that tile of the weights to the
GEMM's dtype, multiplies, and adds the tile's limb products into the output, wrapping mod 2^64
(reduction mod q = 2^log_q is a ring map of the 64-bit words, so partial sums may wrap freely);
the last contraction tile also reduces mod q and rounds. Every partial sum of a float64 GEMM is an
integer below 2^53 (its L1 norm is below the column's), so the result is bit-identical to one
product over the whole layer, and the working memory of a call stays below ``scratch_bytes`` beyond
its input and output, whatever the layer's size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from . import int8_limbs, kernels
from .ciphertext import Ciphertext, MatmulResult
from .errors import ShapeMismatch
from .int8_limbs import Int8Gemm
from .params import Params
from .ring import limb_count
from .sampling import expand_mask
from .weights import PlainWeights, contraction_width


def output_elements(params: Params, tokens: int, width: int) -> int:
    """Output elements :func:`matmul` allocates for such a product, padding slots included: blocks x
    n x width per word matrix (int64 A'' and B'' in the default profile, B'' alone with a shared
    mask), held until the result is serialized."""
    return -(-tokens // params.n) * params.n * width


def provider_limb_bits(l1: int) -> int:
    """Largest limb width whose products with weights of column L1 norm ``l1`` are exact in float64."""
    return max(1, 52 - int(l1).bit_length())


#: Product methods: "f64" = exact float64 limb GEMMs (BLAS), "i64" = torch int64 GEMM wrapping
#: mod 2^64 (no limbs, but torch's int64 matmul is not BLAS), both CPU; bench/backend.py measures
#: them. "int8" = int8 GEMMs on 8-bit limbs by a device's GEMM (int8_limbs.py; int8 weights only).
METHODS = ("f64", "i64", "int8")

#: Working memory of one product beyond its input ciphertext and its output, in bytes: what a
#: provider needs per compute slot on top of the layers it holds. At 128 MiB the float64 path is as
#: fast as one untiled product over the whole layer (measured 13.1 s against 13.4 s at 2048 tokens
#: x 4096 x 4096; 64 MiB took 15.0 s: every row tile costs a pass over the output), and two slots
#: are small next to the 8-24 GB of a gaming GPU's host.
SCRATCH_BYTES = 128 << 20


@dataclass(frozen=True)
class Tiles:
    """How one product is cut: ``rows`` contraction rows by ``cols`` output columns per GEMM, and
    the bytes of working memory that costs (``scratch``), the largest a call allocates at once."""

    rows: int
    cols: int
    scratch: int


def plan_tiles(method: str, *, contraction: int, width: int, n: int, words: int, limbs: int, mask_rows: bool,
               scratch_bytes: int = SCRATCH_BYTES) -> Tiles:
    """The largest tiles whose buffers fit ``scratch_bytes`` (at least one row and one column).

    ``words``: word matrices multiplied per block (2: A and B, 1: B alone); ``mask_rows``: whether
    the tile's rows of A are expanded. Bytes per contraction row of a tile: the limbs of every word
    and, for A, the expanded row plus AES's zero input (``sampling._zero_bytes``, kept by the
    process and grown to up to twice the largest request); per output column: the GEMM's output
    (and, for int8, the int64 sum of its contraction pieces); per weight of the tile: its copy in
    the GEMM's dtype. For int8 these are what :func:`int8_limbs.limb_products` and the CPU's GEMM
    allocate (int32 copies of both operands included). Contraction rows get up to 3/4 of the
    budget first: the output is touched once per row tile, while columns only set the GEMM's shape.
    """
    row_b, col_b, cell = (5, 12, 5) if method == "int8" else (8, 8, 8)
    row = row_b * words * limbs * n + (24 * n if mask_rows else 0)
    col = col_b * words * limbs * n
    rows = max(1, min(contraction, scratch_bytes * 3 // 4 // row))
    cols = max(1, min(width, (scratch_bytes - rows * row) // (col + rows * cell)))
    if cols == width:  # narrow outputs leave more room for rows
        rows = max(1, min(contraction, (scratch_bytes - cols * col) // (row + cols * cell)))
    return Tiles(rows=rows, cols=cols, scratch=rows * row + cols * col + rows * cols * cell)


class BlockProduct:
    """One product ``x @ w`` (or ``x @ w.T``) prepared to be computed a ring block at a time: the
    weights and parameters checked, the tiles planned and their buffers allocated once. A provider
    that streams its reply computes a block, sends it and computes the next, so a request's output
    in memory is one block's, not the whole product's; :func:`matmul` computes every block into one
    result. Blocks are independent: any order gives the same words. Not thread-safe (the buffers
    are shared by its blocks): one block at a time."""

    def __init__(
        self,
        ct: Ciphertext,
        weights: "torch.Tensor | PlainWeights",
        *,
        transpose: bool = False,
        method: str = "f64",
        gemm: Int8Gemm = int8_limbs.cpu_int8_gemm,
        scratch_bytes: int = SCRATCH_BYTES,
    ) -> None:
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        pw = PlainWeights.of(weights)
        contraction, width = contraction_width(pw, transpose)
        if ct.d != contraction:
            raise ShapeMismatch(f"ciphertext has {ct.d} features, weights{'.T' if transpose else ''} contract over {contraction}")
        p = ct.params
        stats = pw.stats(transpose)
        p.for_weights(stats)
        if method == "f64":
            lb = provider_limb_bits(stats.l1)
        elif method == "int8":
            int8_limbs.check_weights(pw.w)
            lb = int8_limbs.LIMB_BITS
        else:
            lb = 64  # one "limb": the whole word, whose int64 product wraps mod 2^64, a multiple of q
        self.ct, self.method, self._gemm, self._lb = ct, method, gemm, lb
        self.contraction, self.width = contraction, width
        self._limbs = limbs = limb_count(p.in_bits, lb)
        n = p.n
        self.shared = shared = p.shared_mask  # the single mask per block needs no product: only B @ W
        self._words = words = 1 if shared else 2
        self.tiles = tiles = plan_tiles(method, contraction=contraction, width=width, n=n, words=words, limbs=limbs,
                                        mask_rows=not shared, scratch_bytes=scratch_bytes)
        self._left = (pw.w if transpose else pw.w.t()).numpy()  # (width, contraction): a view of the held weights
        self._out_bits = [p.out_bits_b] if shared else [p.out_bits_a, p.out_bits_b]
        # buffers of the largest tile, reused by every tile; edge tiles use their leading part
        self._mask_buf = None if shared else np.empty(tiles.rows * n * 8 + 15, dtype=np.uint8)
        if method != "int8":
            self._z_buf = np.empty((tiles.rows, words, limbs, n), dtype=np.float64 if method == "f64" else np.int64)
            self._w_buf = np.empty((tiles.cols, tiles.rows), dtype=self._z_buf.dtype)
            self._prod_buf = np.empty((tiles.cols, words * limbs * n), dtype=self._z_buf.dtype)

    def empty_block(self) -> tuple[np.ndarray | None, np.ndarray]:
        """Arrays for one block's output: (A'' or None with a shared mask, B''), each (width, n) int64."""
        b = np.empty((self.width, self.ct.params.n), dtype=np.int64)
        return (None if self.shared else np.empty_like(b)), b

    def result(self) -> MatmulResult:
        """Every block, computed into one result."""
        ct = self.ct
        b_out = np.empty((ct.blocks, self.width, ct.params.n), dtype=np.int64)
        a_out = None if self.shared else np.empty_like(b_out)
        for blk in range(ct.blocks):
            self.block(blk, None if a_out is None else a_out[blk], b_out[blk])
        return MatmulResult(params=ct.params, key_id=ct.key_id, tokens=ct.tokens, a_words=a_out, b_words=b_out,
                            seeds=ct.seeds if self.shared else ())

    def block(self, blk: int, a_out: np.ndarray | None, b_out: np.ndarray) -> None:
        """Compute block ``blk`` of the product into ``a_out`` (None with a shared mask) and ``b_out``."""
        ct, p, tiles, lb, limbs, words = self.ct, self.ct.params, self.tiles, self._lb, self._limbs, self._words
        n, contraction, width, method, left = p.n, self.contraction, self.width, self.method, self._left
        outs = [b_out] if self.shared else [a_out, b_out]
        for r0 in range(0, contraction, tiles.rows):
            r1 = min(r0 + tiles.rows, contraction)
            rows = [ct.words[blk, r0:r1]]
            if not self.shared:
                rows.insert(0, expand_mask(ct.seeds[blk], n=n, rows=r1 - r0, first_row=ct.first_row + r0, out=self._mask_buf))
            if method != "int8":
                z = self._z_buf[: r1 - r0]
                for i, w in enumerate(rows):
                    if method == "f64":
                        kernels.split_limbs(w, p.in_bits, lb, z[:, i].transpose(1, 0, 2))  # (limbs, rows, n) view
                    else:
                        z[:, i, 0] = w
                z2 = torch.from_numpy(z.reshape(r1 - r0, words * limbs * n))
            for c0 in range(0, width, tiles.cols):
                c1 = min(c0 + tiles.cols, width)
                if method == "int8":
                    tile = np.ascontiguousarray(left[c0:c1, r0:r1], dtype=np.int8)
                    prods = int8_limbs.limb_products(rows, tile, p.in_bits, self._gemm)  # (words * limbs, cols, n)
                else:
                    w_tile = self._w_buf[: c1 - c0, : r1 - r0]
                    np.copyto(w_tile, left[c0:c1, r0:r1])  # exact: the weights are integers below 2^53
                    prod = self._prod_buf[: c1 - c0]
                    torch.mm(torch.from_numpy(w_tile), z2, out=torch.from_numpy(prod))
                    prods = prod.reshape(c1 - c0, words * limbs, n).transpose(1, 0, 2)
                for i, out in enumerate(outs):
                    kernels.join_limbs_switch(prods[i * limbs : (i + 1) * limbs], lb, p.in_bits, self._out_bits[i],
                                              out[c0:c1], r0 == 0, r1 == contraction)


def matmul(
    ct: Ciphertext,
    weights: "torch.Tensor | PlainWeights",
    *,
    transpose: bool = False,
    method: str = "f64",
    gemm: Int8Gemm = int8_limbs.cpu_int8_gemm,
    scratch_bytes: int = SCRATCH_BYTES,
) -> MatmulResult:
    """Encrypted ``x @ w`` (or ``x @ w.T`` when ``transpose``), tile by tile (module docstring):
    no copy of the weights, and at most about ``scratch_bytes`` of working memory beyond the input
    and the output (:func:`plan_tiles`). ``gemm`` is the device GEMM of the int8 method."""
    return BlockProduct(ct, weights, transpose=transpose, method=method, gemm=gemm, scratch_bytes=scratch_bytes).result()
