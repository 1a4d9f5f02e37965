"""Exact negacyclic products by a ternary secret, batched over many polynomials.

The client's only ring arithmetic is ``a * s`` in Z_q[X]/(X^N + 1) for many ``a`` and one ternary
``s``. We evaluate polynomials at the N/2 roots ``zeta_m = exp(i pi (1 - 4m) / N)`` of X^N + 1 (no
two conjugate, so they determine a real polynomial): fold coefficient pairs into
``z_j = (a_j + i a_{j+N/2}) * exp(i pi j / N)`` and take one complex FFT of size N/2 (the "twisted
half-size FFT"); products are pointwise there. Float64 is exact only for small integers, so ``a`` is
cut into signed limbs of LIMB_BITS bits: a limb product is below 2^(LIMB_BITS-1) * N in magnitude,
so the FFT's rounding error (~2^-53 * 2^37 * O(log N)) stays far below 1/2 and rounding returns the
exact integer. The fused kernels in :mod:`.kernels` fold, recombine and finish in one pass each.
"""

from __future__ import annotations

import numpy as np
import scipy.fft

from . import kernels

LIMB_BITS = 26


def limb_count(log_q: int) -> int:
    return (log_q + LIMB_BITS - 1) // LIMB_BITS


class NegacyclicFFT:
    """Twisted half-size FFT of degree ``n`` with a fixed secret's evaluations precomputed."""

    def __init__(self, n: int, secret: np.ndarray) -> None:
        if n < 4 or n & (n - 1):
            raise ValueError("n must be a power of two >= 4")
        if secret.shape != (n,):
            raise ValueError(f"secret must have shape ({n},)")
        self.n = n
        self.half = n // 2
        j = np.arange(self.half)
        self.twist = np.exp(1j * np.pi * j / n)
        self.untwist = np.conj(self.twist) / self.half  # folds the inverse FFT's 1/M in
        f = np.empty((1, 1, self.half), dtype=np.complex128)
        kernels.fold_limbs(secret.reshape(1, n).astype(np.int64), 64, 32, self.twist, f)
        self.secret_eval = scipy.fft.fft(f[0, 0])

    def secret_products(self, words: np.ndarray, log_q: int) -> np.ndarray:
        """Limb products ``limb_l(a_r) * s`` of each row, as inverse-FFT output for a finish kernel.

        ``words``: (rows, n) int64 read mod 2^log_q. Returns (limbs, rows, n/2) complex128 that
        :func:`kernels.finish_encrypt` / :func:`kernels.finish_decrypt` untwist, round and recombine.
        """
        f = np.empty((limb_count(log_q), words.shape[0], self.half), dtype=np.complex128)
        kernels.fold_limbs(words, log_q, LIMB_BITS, self.twist, f)
        f = scipy.fft.fft(f, axis=-1, overwrite_x=True)
        f *= self.secret_eval
        return scipy.fft.ifft(f, axis=-1, overwrite_x=True, norm="forward")
