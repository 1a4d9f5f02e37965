"""Freivalds verification of decrypted products: is ``y == x @ w`` without recomputing it?

For a secret random r (width x m, entries uniform in [0, 2^R)), check ``y @ r == x @ (w @ r)`` in
wrapping uint64 arithmetic. If some row of e = y - x@w is non-zero, fix a non-zero entry e_i: two
values r_i != r_i' that both pass would give e_i (r_i - r_i') = 0 mod 2^64 with
|e_i (r_i - r_i')| < 2^63 (R is chosen from the bound on |e_i|), so e_i = 0, a contradiction. Each
column of r therefore lets a wrong row pass with probability <= 2^-R, and m columns with <= 2^-(R m);
we take R*m >= SOUNDNESS_BITS. The check costs m multiply-adds per value, against d_in for the
product itself. ``w @ r`` is computed once per r; r comes from os.urandom and is rotated with the key.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from . import kernels
from .errors import ShapeMismatch, VerificationFailed
from .evaluator import PlainWeights
from .params import Params
from .parallel import for_row_chunks

SOUNDNESS_BITS = 64


class FreivaldsVerifier:
    """Checks products with one layer's weights (``x @ w``, or ``x @ w.T`` when ``transpose``)."""

    def __init__(self, weights: "torch.Tensor | PlainWeights", *, transpose: bool = False, y_bound: int) -> None:
        """``y_bound`` bounds |y| of any decoded value (honest or not), e.g. q / (2 delta) + 1."""
        pw = PlainWeights.of(weights)
        w = pw.i64.numpy().view(np.uint64)  # two's complement: wrapping products stay exact mod 2^64
        self._w = w.T if transpose else w  # (contraction, width)
        err_bits = (2 * int(y_bound) + 1).bit_length()
        self.r_bits = 63 - err_bits
        if self.r_bits < 8:
            raise ValueError(f"values up to {y_bound} leave too few bits for a sound check")
        self.reps = -(-SOUNDNESS_BITS // self.r_bits)
        width = self._w.shape[1]
        raw = np.frombuffer(os.urandom(8 * width * self.reps), dtype=np.uint64).reshape(width, self.reps)
        r = raw >> np.uint64(64 - self.r_bits)
        # the kernel's layout: one contiguous row per check vector; (w @ r) mod 2^64 is computed once
        self._r_t, self._wr_t = np.ascontiguousarray(r.T), np.ascontiguousarray((self._w @ r).T)

    @classmethod
    def for_params(cls, weights: "torch.Tensor | PlainWeights", params: Params, *, transpose: bool = False) -> "FreivaldsVerifier":
        """A verifier for products decrypted under ``params``."""
        return cls(weights, transpose=transpose, y_bound=params.decoded_bound)

    def check(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Raise :class:`VerificationFailed` unless ``y == x @ w`` (false accept <= 2^-64 per row)."""
        xn = np.ascontiguousarray(x.numpy())  # any integer width: the kernel widens while it reads
        if xn.dtype.kind not in "iu":
            raise ShapeMismatch(f"x must be an integer tensor, got {x.dtype}")
        yn = np.ascontiguousarray(y.numpy(), dtype=np.int64).view(np.uint64)
        if xn.ndim != 2 or yn.ndim != 2 or xn.shape[0] != yn.shape[0]:
            raise ShapeMismatch(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not pair up")
        if xn.shape[1] != self._w.shape[0] or yn.shape[1] != self._w.shape[1]:
            raise ShapeMismatch(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not fit weights {self._w.shape}")
        flags = np.empty(xn.shape[0], dtype=np.bool_)
        for_row_chunks(xn.shape[0], lambda a, b: kernels.freivalds_rows(xn[a:b], self._wr_t, yn[a:b], self._r_t, flags[a:b]), rows=256)
        bad = int(flags.sum())
        if bad:
            raise VerificationFailed(f"{bad} of {yn.shape[0]} rows of the decrypted product are wrong", bad_rows=bad)
