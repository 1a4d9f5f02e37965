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


def to_blocks(x: np.ndarray, n: int) -> np.ndarray:
    """(tokens, d) -> (blocks, d, n) int64, zero-padded: column j of a block is polynomial m_j."""
    tokens, d = x.shape
    blocks = -(-tokens // n)
    padded = np.zeros((blocks * n, d), dtype=np.int64)
    padded[:tokens] = x
    return np.ascontiguousarray(padded.reshape(blocks, n, d).transpose(0, 2, 1))


def from_blocks(y: np.ndarray, tokens: int) -> np.ndarray:
    """(blocks, d, n) -> (tokens, d): the inverse of :func:`to_blocks` without the padding."""
    blocks, d, n = y.shape
    return y.transpose(0, 2, 1).reshape(blocks * n, d)[:tokens]


def encrypt(sk: SecretKey, x: torch.Tensor | np.ndarray) -> Ciphertext:
    """Encrypt ``x`` (tokens x d, signed ``x_bits``-bit integers) in blocks of N tokens.

    Each block gets a fresh seed from os.urandom; b_j = a_j * s + delta * m_j + e_j (mod q).
    """
    p = sk.params
    xm = _as_int_matrix(x, "activations")
    lo, hi = -(1 << (p.x_bits - 1)), (1 << (p.x_bits - 1)) - 1
    if int(xm.min()) < lo or int(xm.max()) > hi:
        raise InputRangeError(f"activations must lie in [{lo}, {hi}] for x_bits={p.x_bits}, got [{xm.min()}, {xm.max()}]")
    msg = to_blocks(xm, p.n)
    blocks, d, n = msg.shape
    out = np.empty_like(msg)
    seeds = tuple(fresh_seed() for _ in range(blocks))
    untwist = sk.ring.untwist
    for b, seed in enumerate(seeds):
        def chunk(r0: int, r1: int, b: int = b, seed: bytes = seed) -> None:
            a = expand_mask(seed, n=n, rows=r1 - r0, first_row=r0)
            f = sk.ring.secret_products(a, p.log_q)
            kernels.finish_encrypt(f, untwist, LIMB_BITS, p.log_q, p.delta, msg[b, r0:r1], random_words(r1 - r0, n), out[b, r0:r1])

        for_row_chunks(d, chunk)
    return Ciphertext(params=p, key_id=sk.key_id, tokens=xm.shape[0], first_row=0, seeds=seeds, words=out)


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
    y = np.empty((blocks, d_out, n), dtype=np.int64)
    untwist = sk.ring.untwist
    for b in range(blocks):
        def chunk(r0: int, r1: int, b: int = b) -> None:
            f = sk.ring.secret_products(res.a_words[b, r0:r1], p.out_bits_a)
            kernels.finish_decrypt(f, untwist, LIMB_BITS, p.log_q, p.out_bits_a, p.out_bits_b, p.delta,
                                   res.b_words[b, r0:r1], y[b, r0:r1])

        for_row_chunks(d_out, chunk)
    return torch.from_numpy(np.ascontiguousarray(from_blocks(y, res.tokens)))
