"""Client side: encrypt activations, decrypt products. Both need the secret key; nothing else does."""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from . import kernels
from .ciphertext import Ciphertext, MatmulResult, last_block_tokens
from .errors import InputRangeError, KeyMismatch, ShapeMismatch
from .keys import SecretKey, check_label, fresh_label
from .parallel import for_row_chunks, scratch
from .params import Params
from .ring import LIMB_BITS, NegacyclicFFT, limb_count
from .sampling import expand_mask, fresh_seed, random_words


def _as_int_matrix(x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
            raise ShapeMismatch(f"{name} must be an integer tensor, got {x.dtype}")
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    if x.ndim != 2 or x.dtype.kind not in "iu":
        raise ShapeMismatch(f"{name} must be a 2-D integer array, got {x.dtype} {x.shape}")
    if x.shape[0] < 1 or x.shape[1] < 1:
        raise ShapeMismatch(f"{name} must be non-empty, got shape {x.shape}")
    return x


def check_range(x: np.ndarray, x_bits: int) -> None:
    """Refuse activations outside the signed ``x_bits`` range the parameters were chosen for."""
    lo, hi = -(1 << (x_bits - 1)), (1 << (x_bits - 1)) - 1
    if int(x.min()) < lo or int(x.max()) > hi:
        raise InputRangeError(f"activations must lie in [{lo}, {hi}] for x_bits={x_bits}, got [{x.min()}, {x.max()}]")


def block_view(x: np.ndarray, n: int, b: int) -> np.ndarray:
    """Block ``b`` of ``x`` (tokens x d) as a (d, n) view: row j is the coefficient vector of m_j.

    A strided view, not a copy (a transposing copy of a large activation matrix costs more than the
    encryption itself); only a partial last block is copied, to pad it with zero tokens.
    """
    part = x[b * n : (b + 1) * n]
    if part.shape[0] < n:
        padded = np.zeros((n, x.shape[1]), dtype=x.dtype)
        padded[: part.shape[0]] = part
        part = padded
    return part.T


#: rows (features) per thread task: the strided message and output columns move in runs of this
#: many words, which is what makes their transposition cheap
CHUNK_ROWS = 128
#: rows per pass through the FFTs: per-call overhead (AES set-up, numba and FFT dispatch) beats the
#: cache here, so 64 rows (2 MiB of limb evaluations at N = 2048) measured faster than 16 or 32
FFT_ROWS = 64

#: (first row, end row) -> inverse-FFT'd limb products (limbs, rows, n/2) complex, for a finish kernel
Products = Callable[[int, int], np.ndarray]


def encrypt_rows(ring: NegacyclicFFT, p: Params, msg: np.ndarray, products: Products, out: np.ndarray) -> None:
    """out[j] = finish(products(j), msg[j]) for every row j of one block, on every core.

    msg is the block's (d, n) view of the activations (strided); out its (d, n) int64 words. Both
    profiles encrypt through here and differ only in ``products``.
    """
    n = p.n

    def chunk(r0: int, r1: int) -> None:
        tile = scratch("msg", (r1 - r0, n), msg.dtype)
        kernels.copy_blocked(msg[r0:r1], tile)
        for s0 in range(r0, r1, FFT_ROWS):
            s1 = min(s0 + FFT_ROWS, r1)
            f = products(s0, s1).view(np.float64)
            noise = random_words(s1 - s0, n, out=scratch("noise", (8 * (s1 - s0) * n + 15,), np.uint8))
            kernels.finish_encrypt(f, ring.untwist_re, ring.untwist_im, LIMB_BITS, p.log_q, p.delta,
                                   tile[s0 - r0 : s1 - r0], noise, out[s0:s1], p.log_q - p.in_bits)

    for_row_chunks(msg.shape[0], chunk, rows=CHUNK_ROWS)


def decrypt_rows(ring: NegacyclicFFT, p: Params, limb_bits: int, out_bits_a: int, b_words: np.ndarray,
                 products: Products, y: np.ndarray) -> None:
    """y[k] = decode(b_words[k], products(k)) for every output column k of one block, on every core.

    y is the block's (d_out, n) view of the tokens x d_out result (strided); both profiles decrypt
    through here.
    """
    n = p.n

    def chunk(r0: int, r1: int) -> None:
        tile = scratch("y", (r1 - r0, n), np.int64)
        for s0 in range(r0, r1, FFT_ROWS):
            s1 = min(s0 + FFT_ROWS, r1)
            f = products(s0, s1).view(np.float64)
            kernels.finish_decrypt(f, ring.untwist_re, ring.untwist_im, limb_bits, p.log_q, out_bits_a, p.out_bits_b,
                                   p.delta, b_words[s0:s1], tile[s0 - r0 : s1 - r0])
        kernels.copy_blocked(tile, y[r0:r1])

    for_row_chunks(b_words.shape[0], chunk, rows=CHUNK_ROWS)


def encrypt(sk: SecretKey, x: torch.Tensor | np.ndarray) -> Ciphertext:
    """Encrypt ``x`` (tokens x d, signed ``x_bits``-bit integers) in blocks of N tokens.

    Each block gets a fresh seed from os.urandom; b_j = a_j * s + delta * m_j + e_j (mod q).
    """
    p = sk.params
    xm = _as_int_matrix(x, "activations")
    check_range(xm, p.x_bits)
    n, (tokens, d) = p.n, xm.shape
    blocks = -(-tokens // n)
    out = np.empty((blocks, d, n), dtype=np.int64)
    seeds = tuple(fresh_seed() for _ in range(blocks))
    limbs = limb_count(p.log_q)
    for b, seed in enumerate(seeds):

        def products(r0: int, r1: int, seed: bytes = seed) -> np.ndarray:
            a = expand_mask(seed, n=n, rows=r1 - r0, first_row=r0, out=scratch("mask", (8 * (r1 - r0) * n + 15,), np.uint8))
            evals = scratch("evals", (limbs, r1 - r0, n // 2), np.complex128)
            return sk.ring.products(a, p.log_q, sk.secret_eval, out=evals)

        encrypt_rows(sk.ring, p, block_view(xm, n, b), products, out[b])
    clear_padding(out, tokens)
    return Ciphertext(params=p, key_id=fresh_label(sk.key_id), tokens=tokens, first_row=0, seeds=seeds, words=out)


def clear_padding(words: np.ndarray, tokens: int) -> None:
    """Zero the last block's words past its real tokens: they never travel (ciphertext.py), and no
    decryption reads them, so both ends hold zeros there (and the product's are zeros too)."""
    words[-1, :, last_block_tokens(tokens, words.shape[0], words.shape[2]) :] = 0


def decrypt(sk: SecretKey, res: MatmulResult) -> torch.Tensor:
    """Decrypt a provider's product to the exact int64 ``x @ w`` (tokens x d_out).

    Decryption does not authenticate: a wrong key or a tampered result yields garbage, which is why
    every product is checked with :mod:`.verify` before use.
    """
    p, kp = res.params, sk.params
    check_label(sk.key_id, res.key_id)
    if (p.n, p.log_q, p.delta) != (kp.n, kp.log_q, kp.delta):
        raise KeyMismatch("result parameters (N, q, delta) differ from the key's")
    blocks, d_out, n = res.a_words.shape
    y = np.empty((blocks * n, d_out), dtype=np.int64)  # tokens x d_out, written through transposed views
    limb_bits = p.out_bits_a if p.decrypt_one_limb else LIMB_BITS
    limbs = limb_count(p.out_bits_a, limb_bits)
    for b in range(blocks):

        def products(r0: int, r1: int, b: int = b) -> np.ndarray:
            evals = scratch("evals", (limbs, r1 - r0, n // 2), np.complex128)
            return sk.ring.products(res.a_words[b, r0:r1], p.out_bits_a, sk.secret_eval, limb_bits, out=evals)

        decrypt_rows(sk.ring, p, limb_bits, p.out_bits_a, res.b_words[b], products, y[b * n : (b + 1) * n].T)
    return torch.from_numpy(y[: res.tokens])
