"""Fused element-wise kernels of the client's ring arithmetic (numba, no GIL).

Each kernel makes one pass over memory where plain numpy would make five or six (centre, split
limbs, fold, twist; untwist, round, shift, add, mask, decode): on a 2-core CPU the client's crypto is
memory-bound around the FFTs, so passes are what cost.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


@njit(cache=True, nogil=True, inline="always")
def _popcount(x):
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return np.int64((x * _H01) >> np.uint64(56))


@njit(cache=True, nogil=True, inline="always")
def _split_low_limb(v, limb_bits):
    """(lo, rest) with lo the centred low limb of v in [-2^(b-1), 2^(b-1)) and v = lo + rest << b."""
    half = np.int64(1) << (limb_bits - 1)
    lo = ((v + half) & ((np.int64(1) << limb_bits) - 1)) - half
    return lo, (v - lo) >> limb_bits


@njit(cache=True, nogil=True)
def fold_limbs(words, log_q, limb_bits, twist, out):
    """Centre words mod 2^log_q, split into signed limbs, fold and twist for the half-size FFT.

    words: (r, n) int64 (only the low log_q bits are read); out: (limbs, r, n/2) complex128 with
    out[l, i, j] = (limb_l(w[i, j]) + 1j * limb_l(w[i, j + n/2])) * twist[j].
    """
    limbs, rows, half = out.shape
    shift = 64 - log_q
    for i in range(rows):
        for j in range(half):
            re = (words[i, j] << shift) >> shift
            im = (words[i, j + half] << shift) >> shift
            t = twist[j]
            for l in range(limbs):
                lo_re, re = _split_low_limb(re, limb_bits)
                lo_im, im = _split_low_limb(im, limb_bits)
                out[l, i, j] = complex(float(lo_re), float(lo_im)) * t


@njit(cache=True, nogil=True)
def _unfold_row(f, untwist, limb_bits, i, acc_re, acc_im):
    """Exact integer coefficients of row i from its limb evaluations after the inverse FFT:
    acc_re[j] = coefficient j, acc_im[j] = coefficient j + n/2 (limb loops kept innermost-simple
    so they vectorise)."""
    acc_re[:] = 0
    acc_im[:] = 0
    for l in range(f.shape[0]):
        sh = limb_bits * l
        for j in range(f.shape[2]):
            z = f[l, i, j] * untwist[j]
            acc_re[j] += np.int64(np.rint(z.real)) << sh
            acc_im[j] += np.int64(np.rint(z.imag)) << sh


@njit(cache=True, nogil=True, inline="always")
def _cbd24(r):
    """Centred binomial sample (eta = 24) from the low 48 bits of a CSPRNG word."""
    low24 = np.uint64(0xFFFFFF)
    return _popcount(r & low24) - _popcount((r >> np.uint64(24)) & low24)


@njit(cache=True, nogil=True)
def finish_encrypt(f, untwist, limb_bits, log_q, delta, msg, rand, out):
    """b = a*s + delta*m + e mod 2^log_q, with e centred binomial (eta=24) from 48 bits of ``rand``.

    f: inverse-FFT'd limb products (limbs, r, n/2); msg: (r, n) int64; rand: (r, n) uint64 CSPRNG
    words; out: (r, n) int64 in [0, 2^log_q).
    """
    half = f.shape[2]
    mask = np.int64(-1) if log_q == 64 else (np.int64(1) << log_q) - 1
    acc_re = np.empty(half, dtype=np.int64)
    acc_im = np.empty(half, dtype=np.int64)
    for i in range(f.shape[1]):
        _unfold_row(f, untwist, limb_bits, i, acc_re, acc_im)
        for j in range(half):
            out[i, j] = (acc_re[j] + delta * msg[i, j] + _cbd24(rand[i, j])) & mask
            k = j + half
            out[i, k] = (acc_im[j] + delta * msg[i, k] + _cbd24(rand[i, k])) & mask


@njit(cache=True, nogil=True, inline="always")
def _decode(b_word, p, sb, sa, shift, delta):
    """round(((b << sb) - (p << sa)) mod 2^log_q, centred, / delta) without overflow."""
    v = (b_word << sb) - (p << sa)
    v = (v << shift) >> shift  # centred representative mod 2^log_q
    y = v // delta  # floor division
    if 2 * (v - y * delta) >= delta:
        y += 1
    return y


@njit(cache=True, nogil=True)
def finish_decrypt(f, untwist, limb_bits, log_q, out_bits_a, out_bits_b, delta, b_words, out):
    """y = round((B'' 2^(k-kb) - (A''*s) 2^(k-ka) mod 2^k) / delta) as signed int64.

    f: inverse-FFT'd limb products of A'' and s (limbs, r, n/2); b_words: (r, n) int64 B'' words.
    """
    half = f.shape[2]
    shift = 64 - log_q
    sa = log_q - out_bits_a
    sb = log_q - out_bits_b
    acc_re = np.empty(half, dtype=np.int64)
    acc_im = np.empty(half, dtype=np.int64)
    for i in range(f.shape[1]):
        _unfold_row(f, untwist, limb_bits, i, acc_re, acc_im)
        for j in range(half):
            out[i, j] = _decode(b_words[i, j], acc_re[j], sb, sa, shift, delta)
            out[i, j + half] = _decode(b_words[i, j + half], acc_im[j], sb, sa, shift, delta)


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
def join_limbs_switch(prods, limb_bits, log_q, out_bits, out):
    """Sum rounded limb products << (limb_bits*l) mod 2^log_q, then round to the top out_bits bits.

    prods: (limbs, r, c) float64 exact integers; out: (r, c) int64 in [0, 2^out_bits).
    """
    limbs, rows, cols = prods.shape
    drop = log_q - out_bits
    qmask = np.int64(-1) if log_q == 64 else (np.int64(1) << log_q) - 1
    omask = np.int64(-1) if out_bits == 64 else (np.int64(1) << out_bits) - 1
    half = np.int64(0) if drop == 0 else np.int64(1) << (drop - 1)
    for i in range(rows):
        for j in range(cols):
            acc = np.int64(0)
            for l in range(limbs):
                acc += np.int64(prods[l, i, j]) << (limb_bits * l)
            acc &= qmask
            if drop:  # round to nearest; unsigned so that acc + half cannot overflow
                acc = np.int64((np.uint64(acc) + np.uint64(half)) >> np.uint64(drop))
            out[i, j] = acc & omask


@njit(cache=True, nogil=True)
def freivalds_rows(x, wr, y, r, bad):
    """bad[t] = any_k (y[t] @ r[:, k] != x[t] @ wr[:, k]) in wrapping uint64 arithmetic.

    x: (T, c) uint64, wr: (c, m), y: (T, w) uint64, r: (w, m); one pass over x and y.
    """
    m = r.shape[1]
    acc = np.zeros(m, dtype=np.uint64)
    for t in range(x.shape[0]):
        acc[:] = 0
        for j in range(y.shape[1]):
            v = y[t, j]
            for k in range(m):
                acc[k] += v * r[j, k]
        for j in range(x.shape[1]):
            v = x[t, j]
            for k in range(m):
                acc[k] -= v * wr[j, k]
        bad[t] = False
        for k in range(m):
            if acc[k] != 0:
                bad[t] = True
