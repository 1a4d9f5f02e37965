"""Provider side: multiply encrypted activations by clear integer weights. No key is involved.

For each block the provider expands the mask A from its seed and computes A' = A @ W and
B' = B @ W (mod q), by default as float64 GEMMs on signed limbs: a limb of ``limb_bits`` bits times
a weight column with L1 norm ``l1`` stays below 2^53 when ``limb_bits - 1 + bitlen(l1) <= 52``, so
BLAS is exact. The limb products are recombined mod q and rounded to the output bits (modulus switch).
On a GPU the same product runs as int8 GEMMs on 8-bit limbs (method="int8", int8_limbs.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from . import int8_limbs, kernels
from .ciphertext import Ciphertext, MatmulResult
from .errors import ShapeMismatch
from .int8_limbs import Int8Gemm
from .params import SHARED_MASK, WeightStats
from .ring import limb_count
from .sampling import expand_mask


@dataclass(eq=False)
class PlainWeights:
    """Clear integer weights (d_in x d_out) prepared once for many products, with their norms.

    ``w`` stays in the integer dtype it came in (int8 for quantized layers). The float64 copy the
    provider's GEMMs read and the int64 copy that exact checks read are made on first use and kept:
    a provider then holds 9 bytes per weight and a client 9, rather than 17 each.
    """

    w: torch.Tensor
    _stats: dict[bool, WeightStats] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        w = self.w
        if not isinstance(w, torch.Tensor):
            w = torch.as_tensor(np.asarray(w))
        if w.ndim != 2 or w.is_floating_point() or w.is_complex() or w.dtype == torch.bool:
            raise ShapeMismatch(f"weights must be a 2-D integer tensor, got {w.dtype} {tuple(w.shape)}")
        self.w = w.contiguous()

    @cached_property
    def f64(self) -> torch.Tensor:
        """float64 copy: exact for integers, what BLAS multiplies."""
        return self.w.to(torch.float64)

    @cached_property
    def i64(self) -> torch.Tensor:
        """int64 view or copy: products that wrap mod 2^64 (Freivalds check, method="i64")."""
        return self.w.to(torch.int64)

    @classmethod
    def of(cls, w: "torch.Tensor | PlainWeights") -> "PlainWeights":
        return w if isinstance(w, PlainWeights) else cls(w)

    def stats(self, transpose: bool) -> WeightStats:
        if transpose not in self._stats:
            self._stats[transpose] = WeightStats.of(self.w, transpose=transpose)
        return self._stats[transpose]


def contraction_width(pw: PlainWeights, transpose: bool) -> tuple[int, int]:
    """(contraction length, output width) of ``x @ w`` or, when ``transpose``, of ``x @ w.T``."""
    d_in, d_out = pw.w.shape
    return (d_out, d_in) if transpose else (d_in, d_out)


def provider_limb_bits(l1: int) -> int:
    """Largest limb width whose products with weights of column L1 norm ``l1`` are exact in float64."""
    return max(1, 52 - int(l1).bit_length())


#: Product methods: "f64" = exact float64 limb GEMMs (BLAS), "i64" = torch int64 GEMM wrapping
#: mod 2^64 (no limbs, but torch's int64 matmul is not BLAS), both CPU; bench/backend.py measures
#: them. "int8" = int8 GEMMs on 8-bit limbs by a device's GEMM (int8_limbs.py; int8 weights only).
METHODS = ("f64", "i64", "int8")


def matmul(
    ct: Ciphertext,
    weights: "torch.Tensor | PlainWeights",
    *,
    transpose: bool = False,
    method: str = "f64",
    gemm: Int8Gemm = int8_limbs.cpu_int8_gemm,
) -> MatmulResult:
    """Encrypted ``x @ w`` (or ``x @ w.T`` when ``transpose``), without copying the weights (the
    int8 method makes one int8 copy). ``gemm`` is the device GEMM of the int8 method."""
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
        left = pw.f64 if transpose else pw.f64.t()  # (width, contraction): a view, BLAS reads it transposed
    elif method == "int8":
        lb = int8_limbs.LIMB_BITS
        left = int8_limbs.weights_int8(pw.w, transpose)
    else:
        lb = 64  # one "limb": the whole word
        left = pw.i64 if transpose else pw.i64.t()
    limbs = limb_count(p.log_q, lb)
    n = p.n
    shared = p.profile == SHARED_MASK  # the single mask per block needs no product: only B @ W
    b_out = np.empty((ct.blocks, width, n), dtype=np.int64)
    a_out = None if shared else np.empty_like(b_out)
    for blk in range(ct.blocks):
        rows = [ct.words[blk]] if shared else [expand_mask(ct.seeds[blk], n=n, rows=ct.d, first_row=ct.first_row), ct.words[blk]]
        if method == "int8":
            prod = int8_limbs.limb_products(rows, left, p.log_q, gemm)  # (len(rows) * limbs, width, n)
        else:
            if method == "f64":
                z = np.empty((len(rows) * limbs, ct.d, n), dtype=np.float64)
                for i, words in enumerate(rows):
                    kernels.split_limbs(words, p.log_q, lb, z[i * limbs : (i + 1) * limbs])
            else:  # words as they are: the int64 product wraps mod 2^64, a multiple of q
                z = np.stack(rows)
            prod = torch.matmul(left, torch.from_numpy(z)).numpy()  # (len(rows) * limbs, width, n)
        kernels.join_limbs_switch(prod[-limbs:], lb, p.log_q, p.out_bits_b, b_out[blk])
        if a_out is not None:
            kernels.join_limbs_switch(prod[:limbs], lb, p.log_q, p.out_bits_a, a_out[blk])
    return MatmulResult(params=p, key_id=ct.key_id, tokens=ct.tokens, a_words=a_out, b_words=b_out,
                        seeds=ct.seeds if shared else ())
