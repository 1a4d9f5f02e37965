"""Exact negacyclic products by a ternary secret, batched over many polynomials.

The client's only ring arithmetic is ``a * s`` in Z_q[X]/(X^N + 1) for many ``a`` and one ternary
``s``. We evaluate polynomials at the N/2 roots ``zeta_m = exp(i pi (1 - 4m) / N)`` of X^N + 1 (no
two conjugate, so they determine a real polynomial): fold coefficient pairs into
``z_j = (a_j + i a_{j+N/2}) * exp(i pi j / N)`` and take one complex FFT of size N/2 (the "twisted
half-size FFT"); products are pointwise there. Float64 is exact only for small integers, so ``a`` is
cut into signed limbs of LIMB_BITS bits: a limb product is below 2^(LIMB_BITS-1) * N in magnitude,
so the FFT's rounding error (~2^-53 * 2^37 * O(log N)) stays far below 1/2 and rounding returns the
exact integer. Decryption tolerates a bounded error (it is just more noise), so it may use one limb;
that error scales with the largest evaluation |s(zeta)|, which every key keeps below
:func:`secret_eval_bound` (:mod:`.keys` draws keys that way). The fused kernels in :mod:`.kernels`
fold, recombine and finish in one pass each; the transforms run in place, by FFTW when the
``fastfft`` extra (pyfftw) is installed (about 1.6x faster here than the default, with measured
plans; FFTW is GPLv2+, hence opt-in) and by scipy's pocketfft (BSD) otherwise. Both meet the error
model the bounds below assume.
"""

from __future__ import annotations

import math
import threading

import numpy as np
import scipy.fft

from . import kernels
from .parallel import ALIGN, aligned_empty

try:
    import pyfftw
except ImportError:  # the optional `fastfft` extra
    pyfftw = None

#: transforms of a hot loop's size (these many points) are planned by measurement, about 0.15 s
#: once per shape; smaller ones and one-off large ones (a key's evaluations) by FFTW's estimate
MEASURE_POINTS = (1 << 16, 1 << 18)
_plans = threading.local()


def fft_library() -> str:
    """Which library computes the transforms (benchmarks print it)."""
    return "FFTW (pyfftw)" if pyfftw is not None else "scipy (pocketfft)"


def _fftw(f: np.ndarray, forward: bool) -> np.ndarray:
    """In-place FFTW transform through this thread's plan for f's shape (a plan is not re-entrant,
    hence one per thread; the second thread's planning reuses the first's wisdom)."""
    plans = _plans.__dict__
    plan = plans.get((f.shape, forward))
    if plan is None:
        template = aligned_empty(f.shape, np.complex128)  # measuring scribbles over its array
        plan = plans[(f.shape, forward)] = pyfftw.FFTW(
            template, template, axes=(f.ndim - 1,), direction="FFTW_FORWARD" if forward else "FFTW_BACKWARD",
            flags=("FFTW_MEASURE" if MEASURE_POINTS[0] <= f.size <= MEASURE_POINTS[1] else "FFTW_ESTIMATE",),
            threads=1, normalise_idft=False)
    plan.update_arrays(f, f)
    plan.execute()
    return f


def _transform(f: np.ndarray, forward: bool) -> np.ndarray:
    """Unnormalised complex FFT (forward) or inverse along the last axis, in f's own memory."""
    if pyfftw is not None and f.flags.c_contiguous and f.ctypes.data % ALIGN == 0:
        return _fftw(f, forward)
    if forward:
        return scipy.fft.fft(f, axis=-1, overwrite_x=True)
    return scipy.fft.ifft(f, axis=-1, overwrite_x=True, norm="forward")


LIMB_BITS = 26
#: the kernels convert and round with kernels.MAGIC, exact for values below 2^ROUND_BITS in magnitude
ROUND_BITS = kernels.ROUND_BITS

#: every key satisfies max |s(zeta)| <= SECRET_EVAL_FACTOR * sqrt(N) over the evaluation points
SECRET_EVAL_FACTOR = 12.0


def secret_eval_bound(n: int) -> float:
    """Largest evaluation |s(zeta)| a key may have; keys.py rejects (and never uses) any other.

    Why this costs nothing in security: Re s(zeta) = sum_t s_t cos(theta_t) is a sum of independent
    zero-mean terms bounded by |cos(theta_t)|, with sum_t cos^2(theta_t) = N/2 exactly at these
    points, so Hoeffding gives P(|Re| >= r) <= 2 exp(-r^2 / N), the same for Im, and
    P(|s(zeta)| >= c sqrt(N)) <= 4 exp(-c^2 / 2). Over the N/2 points a uniform ternary key is
    rejected with probability <= 2N exp(-c^2 / 2) < 2^-87 for c = 12 and N <= 2^15: the accepted keys
    are that close to uniform ternary, as the security table assumes. What it buys: the float64
    product error below scales with this bound instead of ||s||_1 <= N, about 4x tighter at N = 2048,
    which lets decryption take the one-limb product on typical layers (half its FFTs).
    """
    return SECRET_EVAL_FACTOR * math.sqrt(n)


def one_limb_fits(n: int, bits: int) -> bool:
    """Whether a ``bits``-bit operand may go through the product as one (approximate) limb: its
    product coefficients, below n * 2^(bits-1), must stay in the finish kernels' rounding range."""
    return bits - 1 + math.log2(n) < ROUND_BITS


def fft_product_error(n: int, bits: int) -> float:
    """Worst-case |error| (in units of the operand) of a one-limb float64 product a * s, plus rounding.

    Higham (Accuracy and Stability of Numerical Algorithms, 2nd ed., Thm 24.2): a radix-2 FFT of
    size m has relative 2-norm error <= log2(m) * eta / (1 - log2(m) * eta), eta ~ 5u, u = 2^-53.
    Forward transform, pointwise product and inverse contribute three such terms on a result whose
    2-norm is at most ||a||_2 * max|s(zeta)| <= 2^(bits-1) sqrt(n) * secret_eval_bound(n); we bound
    the infinity norm by the 2-norm and double the total for safety.
    """
    u = 2.0**-53
    rel = 3 * math.log2(n // 2) * 5 * u
    return 2 * rel * 2.0 ** (bits - 1) * math.sqrt(n) * secret_eval_bound(n) + 0.5


def limb_count(log_q: int, limb_bits: int = LIMB_BITS) -> int:
    return (log_q + limb_bits - 1) // limb_bits


class NegacyclicFFT:
    """Twisted half-size FFT of degree ``n``: evaluations of integer polynomials and their products.

    Arrays of evaluations are complex128 (limbs, rows, n/2); the kernels read and write them through
    their float64 (limbs, rows, n) view.
    """

    def __init__(self, n: int) -> None:
        if n < 4 or n & (n - 1):
            raise ValueError("n must be a power of two >= 4")
        self.n = n
        self.half = n // 2
        twist = np.exp(1j * np.pi * np.arange(self.half) / n)
        untwist = np.conj(twist) / self.half  # folds the inverse FFT's 1/M in
        self.twist_re, self.twist_im = twist.real.copy(), twist.imag.copy()
        self.untwist_re, self.untwist_im = untwist.real.copy(), untwist.imag.copy()

    def evaluate(self, words: np.ndarray, log_q: int, limb_bits: int = LIMB_BITS, out: np.ndarray | None = None) -> np.ndarray:
        """(rows, n) int64 read mod 2^log_q -> (limbs, rows, n/2) evaluations of its signed limbs.

        ``out``, if given, is a complex128 buffer of that shape (a thread's scratch) filled in place.
        """
        if limb_bits > ROUND_BITS:
            raise ValueError(f"limbs of {limb_bits} bits exceed the kernels' {ROUND_BITS}-bit conversions")
        shape = (limb_count(log_q, limb_bits), words.shape[0], self.half)
        f = aligned_empty(shape, np.complex128) if out is None else out
        kernels.fold_limbs(words, log_q, limb_bits, self.twist_re, self.twist_im, f.view(np.float64))
        return _transform(f, forward=True)

    def products(self, words: np.ndarray, log_q: int, other: np.ndarray, limb_bits: int = LIMB_BITS,
                 out: np.ndarray | None = None) -> np.ndarray:
        """Limb products ``limb_l(a_r) * other`` of each row, as inverse-FFT output for a finish kernel.

        ``other`` holds the n/2 evaluations of one polynomial (the secret), in any shape of that
        size. Returns (limbs, rows, n/2) complex128 that :func:`kernels.finish_encrypt` /
        :func:`kernels.finish_decrypt` untwist, round and recombine (through its float64 view).
        """
        f = self.evaluate(words, log_q, limb_bits, out)
        other = other.reshape(self.half)
        kernels.mul_evals(f.view(np.float64), other.real.copy(), other.imag.copy())
        return self.inverse(f)

    @staticmethod
    def inverse(f: np.ndarray) -> np.ndarray:
        """Inverse transform along the last axis, in place (the 1/M scale is folded into ``untwist``)."""
        return _transform(f, forward=False)


def ternary_eval(ring: NegacyclicFFT, s: np.ndarray) -> np.ndarray:
    """Evaluations (rows, n/2) of ternary polynomials (rows, n): one limb holds them exactly."""
    return ring.evaluate(np.ascontiguousarray(s, dtype=np.int64), 64, 32)[0]
