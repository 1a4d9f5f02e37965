"""Fused element-wise kernels of the client's ring arithmetic (numba, no GIL).

Each kernel makes one pass over memory where plain numpy would make five or six (centre, split
limbs, fold, twist; untwist, round, shift, add, mask, decode): on a 2-core CPU the client's crypto is
memory-bound around the FFTs, so passes are what cost.
"""

from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic



#: v + MAGIC holds round(v) in its low mantissa bits for |v| < 2^51 (1.5 * 2^52 keeps the exponent
#: fixed): rounding to an integer becomes one add and one integer subtract, both vectorisable on
#: AVX2, where float64 -> int64 conversion is not. ROUND_BITS below is the bound callers respect.
MAGIC = 6755399441055744.0
MAGIC_BITS = np.int64(0x4338000000000000)
#: |v| below 2^ROUND_BITS is what the MAGIC trick converts exactly, either way
ROUND_BITS = 51


@intrinsic
def _bits_as_float(typingctx, x):
    """The float64 whose bit pattern is the int64 ``x`` (a register move)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())

    return types.float64(x), codegen


@njit(cache=True, nogil=True, inline="always")
def _small_to_float(v):
    """float64(v) for |v| < 2^51: MAGIC's bits plus v, read as a float, minus MAGIC (one integer add
    and one float subtract, vectorisable on AVX2; half the work of :func:`_to_float`)."""
    return _bits_as_float(v + MAGIC_BITS) - MAGIC


@njit(cache=True, nogil=True, inline="always")
def _to_float(v):
    """float64(v) for any int64 v through two int32 conversions (vectorisable on AVX2)."""
    hi = np.int32(v >> 32)
    lo = np.int32((v & 0xFFFFFFFF) - 0x80000000)
    return float(hi) * 4294967296.0 + (float(lo) + 2147483648.0)


@intrinsic
def _popcount(typingctx, x):
    """LLVM's ctpop on a 64-bit integer: one instruction, and a byte-table shuffle when vectorised on
    AVX2 (about 3x faster here than the shift-and-mask form)."""
    if not isinstance(x, types.Integer) or x.bitwidth != 64:
        return None

    def codegen(context, builder, signature, args):
        return builder.call(builder.module.declare_intrinsic("llvm.ctpop", [ir.IntType(64)]), args)

    return types.int64(x), codegen


@njit(cache=True, nogil=True, inline="always")
def _cbd24(r):
    """Centred binomial sample (eta = 24) from the low 48 bits of a CSPRNG word: popcount of bits
    0-23 minus popcount of bits 24-47."""
    low24 = np.uint64(0xFFFFFF)
    return _popcount(r & low24) - _popcount((r >> np.uint64(24)) & low24)


@njit(cache=True, nogil=True, inline="always")
def _split_low_limb(v, limb_bits):
    """(lo, rest) with lo the centred low limb of v in [-2^(b-1), 2^(b-1)) and v = lo + rest << b."""
    half = np.int64(1) << (limb_bits - 1)
    lo = ((v + half) & ((np.int64(1) << limb_bits) - 1)) - half
    return lo, (v - lo) >> limb_bits


@njit(cache=True, nogil=True)
def fold_limbs(words, log_q, limb_bits, twist_re, twist_im, out):
    """Centre words mod 2^log_q, split into signed limbs, fold and twist for the half-size FFT.

    words: (r, n) int64 (only the low log_q bits are read); out: (limbs, r, n) float64, the
    interleaved view of complex (limbs, r, n/2) with
    out[l, i, j] = (limb_l(w[i, j]) + 1j * limb_l(w[i, j + n/2])) * twist[j].
    One limb at a time over a row, so every loop is a plain vectorisable sweep. Limbs are at most
    ROUND_BITS wide (ring.evaluate refuses wider ones, which could not be rounded back either).
    """
    limbs, rows, n = out.shape
    half = n // 2
    shift = 64 - log_q
    narrow = limb_bits <= 32
    re = np.empty(half, dtype=np.int64)
    im = np.empty(half, dtype=np.int64)
    for i in range(rows):
        for j in range(half):
            re[j] = (words[i, j] << shift) >> shift
            im[j] = (words[i, j + half] << shift) >> shift
        for l in range(limbs):
            o = out[l, i]
            for j in range(half):
                lo_re, re[j] = _split_low_limb(re[j], limb_bits)
                lo_im, im[j] = _split_low_limb(im[j], limb_bits)
                if narrow:  # one int32 conversion; the loop is unswitched on this flag
                    a = float(np.int32(lo_re))
                    b = float(np.int32(lo_im))
                else:
                    a = _small_to_float(lo_re)
                    b = _small_to_float(lo_im)
                o[2 * j] = a * twist_re[j] - b * twist_im[j]
                o[2 * j + 1] = a * twist_im[j] + b * twist_re[j]


@njit(cache=True, nogil=True)
def mul_evals(f, other_re, other_im):
    """f[l, i] *= other pointwise, f being the float64 (limbs, r, n) view of complex evaluations and
    other (n/2,) complex given as its real and imaginary parts: twice numpy's speed on complex128."""
    limbs, rows, n = f.shape
    for l in range(limbs):
        for i in range(rows):
            row = f[l, i]
            for j in range(n // 2):
                a = row[2 * j]
                b = row[2 * j + 1]
                row[2 * j] = a * other_re[j] - b * other_im[j]
                row[2 * j + 1] = a * other_im[j] + b * other_re[j]


@njit(cache=True, nogil=True, inline="always")
def _unfold_row(f, untwist_re, untwist_im, limb_bits, i, tmp, acc):
    """acc[t] = exact integer coefficient t of row i from its limb evaluations after the inverse FFT
    (f: (limbs, r, n) float64 interleaved): untwist, round, shift and add, limb by limb."""
    limbs, rows, n = f.shape
    half = n // 2
    bits = tmp.view(np.int64)
    for l in range(limbs):
        fl = f[l, i]
        for j in range(half):
            a = fl[2 * j]
            b = fl[2 * j + 1]
            tmp[j] = (a * untwist_re[j] - b * untwist_im[j]) + MAGIC
            tmp[j + half] = (a * untwist_im[j] + b * untwist_re[j]) + MAGIC
        if l == 0:
            for j in range(n):
                acc[j] = bits[j] - MAGIC_BITS
        else:
            sh = limb_bits * l
            for j in range(n):
                acc[j] += (bits[j] - MAGIC_BITS) << sh


@njit(cache=True, nogil=True)
def finish_encrypt(f, untwist_re, untwist_im, limb_bits, log_q, delta, msg, rand, out, drop=0):
    """b = a*s + delta*m + e mod 2^log_q, with e centred binomial (eta=24) from 48 bits of ``rand``;
    with ``drop`` > 0, b rounded stochastically to a (log_q - drop)-bit word: floor((b + u) / 2^drop)
    with u uniform in [0, 2^drop) from the top 16 bits of the same ``rand`` word (params.py).

    f: inverse-FFT'd limb products (limbs, r, n) float64; msg: (r, n) integers; rand: (r, n) uint64
    CSPRNG words; out: (r, n) int64 in [0, 2^(log_q - drop)).
    """
    limbs, rows, n = f.shape
    mask = np.int64(-1) if log_q == 64 else (np.int64(1) << log_q) - 1
    low = (np.int64(1) << drop) - 1
    kept = (np.int64(1) << (log_q - drop)) - 1 if drop else mask
    tmp = np.empty(n)
    acc = np.empty(n, dtype=np.int64)
    for i in range(rows):
        _unfold_row(f, untwist_re, untwist_im, limb_bits, i, tmp, acc)
        for j in range(n):
            v = acc[j] + delta * np.int64(msg[i, j]) + _cbd24(rand[i, j])
            if drop:
                u = np.int64(rand[i, j] >> np.uint64(48)) & low
                v = ((v >> drop) + (((v & low) + u) >> drop)) & kept  # no carry out of 64 bits
            out[i, j] = v & mask


@njit(cache=True, nogil=True)
def finish_decrypt(f, untwist_re, untwist_im, limb_bits, log_q, out_bits_a, out_bits_b, delta, b_words, out):
    """y = round_half_up(((B'' 2^(k-kb) - (A''*s) 2^(k-ka)) mod 2^k, centred) / delta), as int64.

    f: inverse-FFT'd limb products of A'' and s (limbs, r, n) float64; b_words: (r, n) int64 B''
    words. The quotient is taken in float64 and then corrected by one exact integer step, which
    replaces a 64-bit division per value; Params keeps |y| below 2^50 so the rounding trick holds.
    """
    limbs, rows, n = f.shape
    shift = 64 - log_q
    sa = log_q - out_bits_a
    sb = log_q - out_bits_b
    inv = 1.0 / delta
    tmp = np.empty(n)
    bits = tmp.view(np.int64)
    acc = np.empty(n, dtype=np.int64)
    for i in range(rows):
        _unfold_row(f, untwist_re, untwist_im, limb_bits, i, tmp, acc)
        for j in range(n):
            v = (b_words[i, j] << sb) - (acc[j] << sa)
            v = (v << shift) >> shift  # centred representative mod 2^log_q
            acc[j] = v
            tmp[j] = (_small_to_float(v) if log_q <= ROUND_BITS + 1 else _to_float(v)) * inv + MAGIC
        for j in range(n):
            v = acc[j]
            y = bits[j] - MAGIC_BITS  # within 1 of the exact quotient
            r2 = 2 * (v - y * delta)
            out[i, j] = y + np.int64(r2 >= delta) - np.int64(r2 < -delta)


#: side of the square tiles of :func:`copy_blocked`: a tile's rows on either side stay in L1
COPY_BLOCK = 8


def copy_blocked(src: np.ndarray, dst: np.ndarray) -> None:
    """dst[i, j] = src[i, j], tile by tile.

    One side is a transposed view of a big (tokens x features) matrix. Each COPY_BLOCK-square tile
    goes through a small buffer, read along the rows of whichever side is row-major and written
    along the rows of the other, so both sides move in runs of whole cache lines. Copying src.T to
    dst.T is the same copy, so the kernel only ever reads a row-major source.
    """
    if src.strides[1] > src.strides[0]:
        src, dst = src.T, dst.T
    _copy_tiles(src, dst)


@njit(cache=True, nogil=True)
def _copy_tiles(src, dst):
    """copy_blocked's kernel, for a source read along its rows."""
    rows, cols = dst.shape
    b = COPY_BLOCK
    tile = np.empty((b, b), dst.dtype)
    full_rows, full_cols = rows - rows % b, cols - cols % b
    for i0 in range(0, full_rows, b):
        for j0 in range(0, full_cols, b):
            for i in range(b):
                for j in range(b):
                    tile[i, j] = src[i0 + i, j0 + j]
            for j in range(b):
                for i in range(b):
                    dst[i0 + i, j0 + j] = tile[i, j]
    for i in range(rows):  # the ragged edges
        for j in range(full_cols if i < full_rows else 0, cols):
            dst[i, j] = src[i, j]


@njit(cache=True, nogil=True)
def split_limbs(words, log_q, limb_bits, out):
    """Centre words mod 2^log_q and split them into signed limbs: out[l, i, j] = limb_l(words[i, j]).

    ``out`` may be float64 (the provider's BLAS limbs) or int8 with 8-bit limbs (the GPU's; a view
    laid out as (limbs, r, c) over any memory order). An int8 top limb reaches +128 only when
    log_q = 8 * limbs and then wraps to -128, which changes the word by 2^log_q: nothing mod q.
    """
    limbs, rows, cols = out.shape
    shift = 64 - log_q
    for i in range(rows):
        for j in range(cols):
            v = (words[i, j] << shift) >> shift
            for l in range(limbs):
                lo, v = _split_low_limb(v, limb_bits)
                out[l, i, j] = lo


@njit(cache=True, nogil=True)
def join_limbs_switch(prods, limb_bits, log_q, out_bits, out, first=True, last=True):
    """Sum rounded limb products << (limb_bits*l) mod 2^log_q, then round to the top out_bits bits.

    prods: (limbs, r, c) exact integers (float64, int32 or int64); out: (r, c) int64 in
    [0, 2^out_bits). A product cut along its contraction comes in tiles: each adds its sum into
    ``out`` mod 2^64 (``first``: ``out`` starts at 0; reduction mod 2^log_q is a ring map of the
    64-bit words, so the partial sums may wrap), and the ``last`` reduces and rounds.
    """
    limbs, rows, cols = prods.shape
    drop = log_q - out_bits
    qmask = np.int64(-1) if log_q == 64 else (np.int64(1) << log_q) - 1
    omask = np.int64(-1) if out_bits == 64 else (np.int64(1) << out_bits) - 1
    half = np.int64(0) if drop == 0 else np.int64(1) << (drop - 1)
    for i in range(rows):
        for j in range(cols):
            acc = np.int64(0) if first else out[i, j]
            for l in range(limbs):
                acc += np.int64(prods[l, i, j]) << (limb_bits * l)
            if last:
                acc &= qmask
                if drop:  # round to nearest; unsigned so that acc + half cannot overflow
                    acc = np.int64((np.uint64(acc) + np.uint64(half)) >> np.uint64(drop))
                acc &= omask
            out[i, j] = acc


@njit(cache=True, nogil=True)
def freivalds_rows(x, wr_t, y, r_t, bounds, y_bound, tol, bad):
    """bad[t] = any |y[t, j]| > y_bound, or, for some column block g and check k,
    |y[t, block g] @ r_t[k, block g] - x[t] @ wr_t[g, k]| > tol[g, k], the difference taken in
    wrapping uint64 arithmetic and read as signed (tol = 0: the exact check, one block).

    x: (T, c) integers of any width (sign-extended, then read mod 2^64), wr_t: (G, m, c) uint64,
    y: (T, w) uint64 (int64 two's complement), r_t: (m, w) uint64, bounds: (G + 1,) the blocks'
    columns in y, tol: (G, m) uint64: each check vector is contiguous, so every dot product is one
    vectorisable sweep over a row that stays in cache across the m checks. Both bound tests read a
    value v as signed with one comparison: v + b wraps above 2 b exactly when |v| > b.
    """
    m = r_t.shape[0]
    span = np.uint64(2) * y_bound
    for t in range(x.shape[0]):
        out = False
        for j in range(y.shape[1]):
            out |= y[t, j] + y_bound > span
        bad[t] = out
        for g in range(bounds.shape[0] - 1):
            for k in range(m):
                acc = np.uint64(0)
                for j in range(bounds[g], bounds[g + 1]):
                    acc += y[t, j] * r_t[k, j]
                for j in range(x.shape[1]):
                    acc -= np.uint64(np.int64(x[t, j])) * wr_t[g, k, j]
                if acc + tol[g, k] > np.uint64(2) * tol[g, k]:
                    bad[t] = True


@njit(cache=True, nogil=True)
def sketch_columns(w, r_t, grid, out, c0, c1):
    """out[b, k, j] = sum over rows i of block b of w[i, j] * r_t[k, i] for columns c0 <= j < c1,
    wrapping mod 2^64: a Freivalds sketch read along w's contiguous rows.

    w: (width, contraction) int8, rows being the checked product's output axis (a layer's W for
    ``g @ W.T``, a transposed tile of it for ``x @ W``); r_t: (m, width) uint64; grid: the output
    blocks' bounds; out: (blocks, m, contraction) uint64. The inner loop is an axpy over a
    contiguous row: one vectorised multiply-add per weight and check vector (a dot product along
    the other axis measured about 5x slower).
    """
    m = r_t.shape[0]
    for b in range(grid.shape[0] - 1):
        for k in range(m):
            for j in range(c0, c1):
                out[b, k, j] = 0
            for i in range(grid[b], grid[b + 1]):
                rk = r_t[k, i]
                for j in range(c0, c1):
                    out[b, k, j] += np.uint64(np.int64(w[i, j])) * rk


@njit(cache=True, nogil=True)
def quantize_rows(x, column_scale, n_bits, q, scale, offset, finite):
    """Per-token affine quantization of rows of ``x`` (float32 or float64) times ``column_scale``
    (float64, or empty for none) to ``n_bits``, in two sweeps per row and no temporary: the same
    float64 operations, in the same order, as the torch reference (``trainer.quantization``):
    v = x * c; lo, hi = min, max; s = (hi - lo) / levels; q = clamp(rint((v - lo) / s), 0, levels)
    + qmin (dividing by 1 where s is not > 0: a constant row, all qmin); offset = lo - qmin * s.
    ``finite[t]`` is False where any value is not.
    """
    levels = (1 << n_bits) - 1
    qmin = -(1 << (n_bits - 1))
    scaled = column_scale.shape[0] > 0
    for t in range(x.shape[0]):
        lo = np.inf
        hi = -np.inf
        ok = True
        for j in range(x.shape[1]):
            v = np.float64(x[t, j])
            if scaled:
                v = v * column_scale[j]
            lo = min(lo, v)
            hi = max(hi, v)
            ok &= v - v == 0.0  # False for nan and +-inf, which min and max would pass over
        finite[t] = ok
        s = (hi - lo) / levels
        if not s > 0:
            s = 0.0
        div = s if s > 0 else 1.0
        for j in range(x.shape[1]):
            v = np.float64(x[t, j])
            if scaled:
                v = v * column_scale[j]
            r = np.rint((v - lo) / div)
            r = min(max(r, 0.0), np.float64(levels))
            q[t, j] = np.int64(r) + qmin
        scale[t] = s
        offset[t] = lo - qmin * s


@njit(cache=True, nogil=True)
def dequantize_rows(y, scale, offset, weight_sums, out_scale, out):
    """out[t, k] = (y[t, k] * scale[t] + offset[t] * weight_sums[k]) * out_scale[k] (the last factor
    when out_scale is not empty), in float64, in one sweep: the torch reference's operations, each
    rounded (torch may fuse the multiply-add: the two agree to a float64's last bit)."""
    scaled = out_scale.shape[0] > 0
    for t in range(y.shape[0]):
        s = scale[t]
        o = offset[t]
        for k in range(y.shape[1]):
            v = np.float64(y[t, k]) * s + o * weight_sums[k]
            if scaled:
                v = v * out_scale[k]
            out[t, k] = v
