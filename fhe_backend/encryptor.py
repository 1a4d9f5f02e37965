"""Client side: encrypt activations, decrypt products. Both need the secret key; nothing else does."""

from __future__ import annotations

import numpy as np
import torch

from . import kernels
from .ciphertext import Ciphertext, MatmulResult
from .errors import InputRangeError, KeyMismatch, ShapeMismatch
from .keys import SecretKey
from .parallel import for_row_chunks
from .ring import LIMB_BITS
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
    untwist = sk.ring.untwist
    for b, seed in enumerate(seeds):
        msg = block_view(xm, n, b)

        def chunk(r0: int, r1: int, b: int = b, seed: bytes = seed, msg: np.ndarray = msg) -> None:
            a = expand_mask(seed, n=n, rows=r1 - r0, first_row=r0)
            f = sk.ring.products(a, p.log_q, sk.secret_eval)
            kernels.finish_encrypt(f, untwist, LIMB_BITS, p.log_q, p.delta, msg[r0:r1], random_words(r1 - r0, n), out[b, r0:r1])

        for_row_chunks(d, chunk)
    return Ciphertext(params=p, key_id=sk.key_id, tokens=tokens, first_row=0, seeds=seeds, words=out)


def decrypt(sk: SecretKey, res: MatmulResult) -> torch.Tensor:
    """Decrypt a provider's product to the exact int64 ``x @ w`` (tokens x d_out).

    Decryption does not authenticate: a wrong key or a tampered result yields garbage, which is why
    every product is checked with :mod:`.verify` before use.
    """
    p, kp = res.params, sk.params
    if res.key_id != sk.key_id:
        raise KeyMismatch(f"result is for key {res.key_id.hex()}, this key is {sk.key_id.hex()}")
    if (p.n, p.log_q, p.delta) != (kp.n, kp.log_q, kp.delta):
        raise KeyMismatch("result parameters (N, q, delta) differ from the key's")
    blocks, d_out, n = res.a_words.shape
    y = np.empty((blocks * n, d_out), dtype=np.int64)  # tokens x d_out, written through transposed views
    untwist = sk.ring.untwist
    limb_bits = p.out_bits_a if p.decrypt_one_limb else LIMB_BITS
    for b in range(blocks):
        yb = y[b * n : (b + 1) * n].T  # (d_out, n) view

        def chunk(r0: int, r1: int, b: int = b, yb: np.ndarray = yb) -> None:
            f = sk.ring.products(res.a_words[b, r0:r1], p.out_bits_a, sk.secret_eval, limb_bits)
            kernels.finish_decrypt(f, untwist, limb_bits, p.log_q, p.out_bits_a, p.out_bits_b, p.delta,
                                   res.b_words[b, r0:r1], yb[r0:r1])

        for_row_chunks(d_out, chunk)
    return torch.from_numpy(y[: res.tokens])
