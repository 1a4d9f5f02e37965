"""Freivalds verification of decrypted products from secret sketches: is ``y == x @ w`` without ``w``?

For a secret random r (width x m, entries uniform in [0, 2^R)), check ``y @ r == x @ (w @ r)`` in
wrapping uint64 arithmetic. If some row of e = y - x@w is non-zero, fix a non-zero entry e_i: two
values r_i != r_i' that both pass would give e_i (r_i - r_i') = 0 mod 2^64 with
|e_i (r_i - r_i')| < 2^63 (R is chosen from the bound on |e_i|), so e_i = 0, a contradiction. Each
column of r therefore lets a wrong row pass with probability <= 2^-R, and m columns with <= 2^-(R m);
we take R*m >= SOUNDNESS_BITS. The check costs m multiply-adds per value, against the contraction
length for the product itself. r is expanded by AES-256-CTR from a seed drawn from os.urandom,
and is rotated with the key.

The verifier keeps the sketch ``w @ r``, not ``w``: m words per contraction row and column block,
so a client checks a layer it does not hold. Chunks of a call may cover any contraction rows and
any run of whole column blocks (``column_grid``): the sketch of a run is the sum of its blocks'
sketches, and a row slice is the same rows of each. A bound check on every decoded value keeps the
soundness argument's premise |e_i| < 2^(63 - R) true for any input, not just for what decryption
can output.

The compact profile decodes approximately (params.py), so an honest row is ``y = x @ w + e`` with a
small noise e, and the check becomes ``|y @ r - x @ (w @ r)| <= T`` per column block and check
vector, T being the noise's tail bound for that r (``Params.check_tolerance``: the fresh noise's
exactly through ||w @ r||, the rest worst case), so an honest row fails with probability below
2^-64. A cheat is then caught only when it is large against T: if row e has a largest error
e_i, the passing r_i (the other entries fixed) lie in an interval of length 2T / |e_i|, so one
check passes with probability at most (2T / |e_i| + 1) / 2^R, and COMPACT_REPS independent ones
with that power. Blocks are checked one by one because T grows with the square root of the block's
width; R leaves the block's sum of errors below 2^63, so the wrapping difference reads as signed.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from . import kernels
from .errors import ShapeMismatch, VerificationFailed
from .params import Params
from .parallel import for_row_chunks
from .sampling import SEED_BYTES, aes_ctr_stream
from .weights import PlainWeights

SOUNDNESS_BITS = 64
#: check vectors of the compact profile's tolerance check (module docstring): an error K times
#: 2T / 2^R passes all of them with probability about K^-COMPACT_REPS
COMPACT_REPS = 8
#: Column blocks of a sketch: one per BLOCK_COLUMNS columns, at most MAX_BLOCKS. Each block costs
#: 8 m bytes per contraction row, so a large layer's sketch costs about 8 m / BLOCK_COLUMNS bytes per
#: weight (m = 2 at 8 bits: 0.016). A layer of at most SMALL_LAYER weights gets at least MIN_BLOCKS,
#: so that a call of a small model can still be cut into that many column chunks, for at most
#: 8 m MIN_BLOCKS SMALL_LAYER / width bytes in all.
MIN_BLOCKS, MAX_BLOCKS, BLOCK_COLUMNS, SMALL_LAYER = 4, 16, 1024, 1 << 18
#: Contraction rows sketched at a time: the scratch of a transposed tile is _TILE_ROWS bytes per
#: output column, whatever the layer's size.
_TILE_ROWS = 256


def column_grid(contraction: int, width: int) -> list[int]:
    """The column block bounds of a product ``contraction`` deep and ``width`` wide: chunks cut
    output columns only here."""
    least = MIN_BLOCKS if contraction * width <= SMALL_LAYER else 1
    blocks = min(width, max(least, min(MAX_BLOCKS, width // BLOCK_COLUMNS)))
    return [width * i // blocks for i in range(blocks + 1)]


def soundness_reps(y_bound: int, block_width: int = 0) -> tuple[int, int]:
    """(R, m): bits per check value and check vectors for decoded values bounded by ``y_bound``:
    exact checks, or, with the widest column block ``block_width``, the compact profile's."""
    err_bits = (2 * int(y_bound) + 1).bit_length() + int(block_width).bit_length()
    r_bits = 63 - err_bits
    if r_bits < 8:
        raise ValueError(f"values up to {y_bound} leave too few bits for a sound check")
    return (r_bits, COMPACT_REPS) if block_width else (r_bits, -(-SOUNDNESS_BITS // r_bits))


def _widest(grid: list[int]) -> int:
    return max(b - a for a, b in zip(grid, grid[1:]))


def sketch_bytes(contraction: int, width: int, params: Params) -> int:
    """Bytes a verifier of one layer and direction keeps: its sketches and the seed of its check vectors."""
    grid = column_grid(contraction, width)
    _, m = soundness_reps(params.decoded_bound, _widest(grid) if params.compact else 0)
    return 8 * m * (len(grid) - 1) * contraction + SEED_BYTES


def _sketch(w: torch.Tensor, r_t: np.ndarray, grid: list[int]) -> np.ndarray:
    """``w[:, block] @ r[block]`` mod 2^64 for each output block, as (blocks, m, contraction) uint64.

    w is (contraction, width) int8 or int16, possibly a transposed view of the layer. The kernel reads rows of
    output: the layer's own rows for a transposed product, and otherwise a transposed copy of
    _TILE_ROWS contraction rows at a time, so the scratch stays a tile whatever the layer's size.
    """
    contraction = w.shape[0]
    out = np.empty((len(grid) - 1, r_t.shape[0], contraction), dtype=np.uint64)
    bounds = np.asarray(grid, dtype=np.int64)
    rows_major = w.t().numpy()  # (width, contraction)
    if rows_major.flags.c_contiguous:
        for_row_chunks(contraction, lambda a, b: kernels.sketch_columns(rows_major, r_t, bounds, out, a, b), rows=_TILE_ROWS)
        return out

    def tile(a: int, b: int) -> None:
        part = np.empty((rows_major.shape[0], b - a), dtype=rows_major.dtype)
        kernels.copy_blocked(rows_major[:, a:b], part)
        kernels.sketch_columns(part, r_t, bounds, out[:, :, a:b], 0, b - a)

    for_row_chunks(contraction, tile, rows=_TILE_ROWS)
    return out


class FreivaldsVerifier:
    """Checks products with one layer's weights (``x @ w``, or ``x @ w.T`` when ``transpose``).

    Holds only secret sketches (see the module docstring): ``nbytes`` of them, about
    8 m / BLOCK_COLUMNS bytes per weight, not the weights."""

    def __init__(
        self, weights: "torch.Tensor | PlainWeights", *, transpose: bool = False, y_bound: int, tolerate: Params | None = None
    ) -> None:
        """``y_bound`` bounds |y| of any decoded value (honest or not), e.g. q / (2 delta) + 1.
        ``tolerate``: compact-profile parameters, whose noise the check then allows (module docstring)."""
        w = PlainWeights.of(weights).w
        if w.dtype not in (torch.int8, torch.int16):
            raise ShapeMismatch(f"sketched weights must be int8 or int16 (the quantized layer), got {w.dtype}")
        w = w.t() if transpose else w  # (contraction, width): a view
        self.contraction, self.width = w.shape
        self.y_bound = int(y_bound)
        self.grid = column_grid(self.contraction, self.width)
        self.tolerate = tolerate if tolerate is not None and tolerate.compact else None
        self.r_bits, self.reps = soundness_reps(self.y_bound, _widest(self.grid) if self.tolerate else 0)
        self._seed = os.urandom(SEED_BYTES)  # r, (m, width), is expanded from it where needed, never kept
        self._s = _sketch(w, self._checks(0, self.width), self.grid)  # (blocks, m, contraction)

    @classmethod
    def for_params(cls, weights: "torch.Tensor | PlainWeights", params: Params, *, transpose: bool = False) -> "FreivaldsVerifier":
        """A verifier for products decrypted under ``params``."""
        return cls(weights, transpose=transpose, y_bound=params.decoded_bound, tolerate=params)

    def _checks(self, c0: int, c1: int) -> np.ndarray:
        """Columns [c0, c1) of the check vectors r (m, c1 - c0): AES-256-CTR under the verifier's
        secret seed, vector k being words k * width' ... of the stream (width' = width rounded up
        to a whole 16-byte block), each word's top R bits."""
        stride = self.width + self.width % 2
        out = np.empty((self.reps, c1 - c0), dtype=np.uint64)
        for k in range(self.reps):
            start = k * stride + c0
            skip = start % 2
            words = aes_ctr_stream(self._seed, start // 2, 8 * (c1 - c0 + skip)).view("<u8")
            out[k] = words[skip : skip + c1 - c0] >> np.uint64(64 - self.r_bits)
        return out

    @property
    def nbytes(self) -> int:
        """Bytes of secret state this verifier keeps."""
        return self._s.nbytes + len(self._seed)

    def _columns(self, output: range | None) -> tuple[int, int]:
        """The blocks [b0, b1) that ``output`` covers exactly; ShapeMismatch unless it is on the grid."""
        if output is None:
            return 0, len(self.grid) - 1
        try:
            return self.grid.index(output.start), self.grid.index(output.stop)
        except ValueError:
            raise ShapeMismatch(f"columns [{output.start}, {output.stop}) are not on the sketch's column grid {self.grid}") from None

    def check(self, x: torch.Tensor, y: torch.Tensor, *, contraction: range | None = None, output: range | None = None,
              params: Params | None = None) -> None:
        """Raise :class:`VerificationFailed` unless ``y == x @ w[contraction, output]`` (false accept
        <= 2^-64 per row). ``contraction``: the rows of the contraction axis x covers (default all);
        ``output``: the output columns y covers, a run of whole column blocks (default all). Any
        value of y beyond the bound the verifier was made for fails the row, whatever else holds.
        ``params``: those y was decrypted under, when not the verifier's own (a compact-profile row
        chunk's, ``Params.with_row_parts``: its noise, not the whole product's, is what is allowed)."""
        xn = np.ascontiguousarray(x.numpy())  # any integer width: the kernel widens while it reads
        if xn.dtype.kind not in "iu":
            raise ShapeMismatch(f"x must be an integer tensor, got {x.dtype}")
        yn = np.ascontiguousarray(y.numpy(), dtype=np.int64).view(np.uint64)
        if xn.ndim != 2 or yn.ndim != 2 or xn.shape[0] != yn.shape[0]:
            raise ShapeMismatch(f"x {tuple(x.shape)} and y {tuple(y.shape)} do not pair up")
        rows = contraction if contraction is not None else range(self.contraction)
        b0, b1 = self._columns(output)
        c0, c1 = self.grid[b0], self.grid[b1]
        if not (0 <= rows.start <= rows.stop <= self.contraction) or xn.shape[1] != len(rows) or yn.shape[1] != c1 - c0:
            raise ShapeMismatch(f"x {tuple(x.shape)} / y {tuple(y.shape)} do not fit rows [{rows.start}, {rows.stop}) "
                                f"and columns [{c0}, {c1}) of weights {(self.contraction, self.width)}")
        r_t = self._checks(c0, c1)
        if self.tolerate is None:  # exact: one check of the run's summed sketch
            wr_t = self._s[b0, :, rows.start : rows.stop].copy()
            for b in range(b0 + 1, b1):
                wr_t += self._s[b, :, rows.start : rows.stop]  # wraps mod 2^64, as the check does
            wr_t, bounds, tol = wr_t[None], np.array([0, c1 - c0], dtype=np.int64), np.zeros((1, self.reps), dtype=np.uint64)
        else:
            wr_t = np.ascontiguousarray(self._s[b0:b1, :, rows.start : rows.stop])
            bounds = np.asarray(self.grid[b0 : b1 + 1], dtype=np.int64) - c0
            tol = self._tolerances(wr_t, r_t, bounds, params if params is not None else self.tolerate)
        flags = np.empty(xn.shape[0], dtype=np.bool_)
        bound = np.uint64(self.y_bound)
        for_row_chunks(xn.shape[0], lambda a, b: kernels.freivalds_rows(xn[a:b], wr_t, yn[a:b], r_t, bounds, bound, tol, flags[a:b]), rows=256)
        bad = int(flags.sum())
        if bad:
            raise VerificationFailed(f"{bad} of {yn.shape[0]} rows of the decrypted product are wrong", bad_rows=bad)

    def _tolerances(self, wr_t: np.ndarray, r_t: np.ndarray, bounds: np.ndarray, params: Params) -> np.ndarray:
        """(blocks, m) uint64: each block's and check vector's T (``Params.check_tolerance``), rounded up.
        The sketch's words are the exact signed values w @ r (R keeps them below 2^63)."""
        wr = wr_t.view(np.int64).astype(np.float64)
        r = r_t.astype(np.float64)
        tol = np.empty(wr.shape[:2], dtype=np.uint64)
        for g in range(wr.shape[0]):
            for k in range(wr.shape[1]):
                l2sq = float(np.dot(wr[g, k], wr[g, k])) * (1 + wr.shape[2] * 2.0**-52)  # covers the float64 sum's error
                l1 = float(r[k, bounds[g] : bounds[g + 1]].sum())
                tol[g, k] = math.ceil(params.check_tolerance(l2sq, l1)) + 1
        return tol
