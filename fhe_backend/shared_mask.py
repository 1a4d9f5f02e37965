"""The shared-mask profile: one mask polynomial per block, one ternary secret per input feature.

Encryption: b_j = a * s_j + delta * m_j + e_j with a single ``a`` per block expanded from the block
seed (AES-256-CTR, the first N words of the stream, as in :mod:`.sampling`). The provider computes
only B' = B @ W: column k encrypts (x @ W)[:, k] under the secret z_k = sum_j W[j,k] s_j, so the
client binds its key to the layer, Z = W^T S (one product of N tokens by the layer per key and
range of contraction rows, from its own copy of the integer weights), and decrypts
y_k = round((B'_k - a * z_k) / delta). This halves the provider's work, and the bytes it returns
carry no mask product: a result is B'' alone, one word per real token, however few tokens the
block holds. It costs the client the binding's product and memory for Z, N integers per output
column (:attr:`SharedMaskKey.nbytes`); the secrets are expanded from a seed whenever used.

Security: each s_j is an independent ternary RLWE secret; sharing ``a`` across them is the standard
multi-secret setting (a hybrid over j reduces it to RLWE with one secret), under the same 128-bit
table.

The product a * z_k must be exact (its error would be multiplied by the limb shifts), and z_k is
not ternary (|z| <= L1 of the weights), so both are cut into ``limb_bits``-bit limbs, chosen so that
the worst-case float64 error of every summed limb product stays below 1/4 (bound as in
:func:`.ring.fft_product_error`). Products whose shift reaches log_q vanish mod q and are skipped.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .ciphertext import Ciphertext, MatmulResult
from .encryptor import _as_int_matrix, block_view, check_range, clear_padding, decrypt_rows, encrypt_rows
from .errors import KeyMismatch, ParameterError, ShapeMismatch
from .keys import KEY_ID_BYTES, check_label, fresh_label
from .parallel import scratch
from .params import Params
from .ring import LIMB_BITS, NegacyclicFFT, limb_count
from .sampling import SEED_BYTES, expand_mask, expand_ternary, fresh_seed
from .weights import PlainWeights, contraction_width


#: ternary secrets are read as 2-bit words: one centred limb holds them exactly
_SECRET_BITS = 2
#: Output columns of W^T S computed at a time: the float64 tile of weights costs 8 bytes per
#: contraction row per column (about 30 MB at LLaMA-8B's 14336 rows).
_Z_TILE_COLUMNS = 256


def _evaluations(ring: NegacyclicFFT, words: np.ndarray, log_q: int, limb_bits: int, name: str) -> np.ndarray:
    """Evaluations (limbs, rows, n/2) of a tile of (rows, n) integer words, read mod 2^log_q, in this
    thread's scratch buffers: the tiles of every block would otherwise allocate (and page-fault in)
    a few MB each."""
    rows, n = words.shape
    wide = scratch(f"{name} words", (rows, n), np.int64)
    wide[:] = words
    out = scratch(f"{name} evals", (limb_count(log_q, limb_bits), rows, n // 2), np.complex128)
    return ring.evaluate(wide, log_q, limb_bits, out=out)


def exact_limb_bits(n: int, z_bits: int) -> int:
    """Largest limb width (<= 26) whose summed limb products a_l * z_m stay exact in float64."""
    u = 2.0**-53
    rel = 3 * math.log2(n // 2) * 5 * u
    for bits in range(LIMB_BITS, 7, -1):
        terms = limb_count(z_bits, bits)  # products that can share one shift level
        worst = 2 * rel * 2.0 ** (bits - 1) * math.sqrt(n) * n * 2.0 ** (bits - 1) * terms
        if worst < 0.25:
            return bits
    raise ParameterError(f"no exact limb width for N={n}")


@dataclass(frozen=True, eq=False, repr=False)
class Binding:
    """Z = W^T S over one range of contraction rows, for every output column of a layer: what
    decrypting a product over those rows needs. A product over a row range reads only those rows'
    secrets, so each row range a call is cut into has its own binding. Z is kept as integers (4
    bytes each while they fit) and evaluated a tile of columns at a time when a result is decrypted."""

    rows: range
    z: np.ndarray  # (width, n) int32 (int64 if |z| reaches 2^31)
    z_bits: int  # signed width of every |z| (and its sign)
    limb_bits: int  # limbs of z and of the mask whose products stay exact (exact_limb_bits)

    @property
    def width(self) -> int:
        return self.z.shape[0]

    @property
    def nbytes(self) -> int:
        return self.z.nbytes


def _z_bytes(z_bits: int) -> int:
    return 4 if z_bits <= 32 else 8


@dataclass(frozen=True, eq=False, repr=False)
class SharedMaskKey:
    """Secrets s_j of one layer (and direction), expanded from a 32-byte secret seed when used. A
    key is made without weights; :meth:`bind` computes Z = W^T S from the layer's integer weights
    (the client's own copy, read from its checkpoint: the same integers the providers hold) for a
    range of contraction rows, and keeps it for decrypting every product over those rows until
    :meth:`unbind` or the key is dropped."""

    params: Params
    seed: bytes  # expands the secrets (sampling.expand_ternary); never leaves the client
    key_id: bytes
    contraction: int

    ring: NegacyclicFFT = field(init=False)
    _bindings: dict[tuple[int, int], Binding] = field(init=False)

    def __post_init__(self) -> None:
        if not self.params.shared_mask:
            raise ParameterError("a SharedMaskKey needs shared-mask parameters (profile='shared-mask')")
        if self.contraction < 1:
            raise ValueError("contraction must be >= 1")
        object.__setattr__(self, "ring", NegacyclicFFT(self.params.n))
        object.__setattr__(self, "_bindings", {})

    @classmethod
    def generate_key(cls, params: Params, contraction: int) -> "SharedMaskKey":
        """Fresh secrets for a product contracting over ``contraction`` features; bind before decrypting."""
        return cls(params=params, seed=os.urandom(SEED_BYTES), key_id=os.urandom(KEY_ID_BYTES), contraction=contraction)

    def secrets(self, rows: range | None = None) -> np.ndarray:
        """The secrets of contraction ``rows`` (all by default), (rows, n) int8 ternary."""
        rows = range(0, self.contraction) if rows is None else rows
        return expand_ternary(self.seed, n=self.params.n, rows=len(rows), first_row=rows.start)

    def bind(self, weights: "torch.Tensor | PlainWeights", *, transpose: bool = False, rows: range | None = None) -> Binding:
        """Compute and keep Z over contraction ``rows`` (all by default) of ``weights``, the whole
        layer (d_in x d_out; ``transpose`` for g @ w.T). Returns the binding."""
        pw = PlainWeights.of(weights)
        contraction, width = contraction_width(pw, transpose)
        if contraction != self.contraction:
            raise KeyMismatch(f"key has {self.contraction} secrets, the weights contract over {contraction}")
        rows = range(0, contraction) if rows is None else rows
        if not 0 <= rows.start < rows.stop <= contraction or rows.step != 1:
            raise ShapeMismatch(f"rows [{rows.start}, {rows.stop}) are not a range of the {contraction} contraction rows")
        self.params.for_weights(pw.stats(transpose))
        z_bits = self.params.w_l1.bit_length() + 1  # |z_k[t]| <= sum_j |w_jk| <= the parameters' L1
        w = pw.w
        left = (w if transpose else w.t())[:, rows.start : rows.stop]  # (width, rows): a view
        s = torch.from_numpy(self.secrets(rows).astype(np.float64))
        z = np.empty((width, self.params.n), dtype=np.int32 if _z_bytes(z_bits) == 4 else np.int64)
        # exact: |sum_j w_jk s_j[t]| <= L1 < 2^53; float64 weights a tile of columns at a time, so
        # no layer-sized float64 copy exists even while the key is bound
        for c0 in range(0, width, _Z_TILE_COLUMNS):
            tile = left[c0 : c0 + _Z_TILE_COLUMNS].to(torch.float64)
            z[c0 : c0 + _Z_TILE_COLUMNS] = torch.round(tile @ s).numpy()
        binding = Binding(rows=rows, z=z, z_bits=z_bits, limb_bits=exact_limb_bits(self.params.n, z_bits))
        self._bindings[rows.start, rows.stop] = binding
        return binding

    def binding(self, rows: range | None = None) -> Binding:
        """The kept binding over ``rows`` (all by default); KeyMismatch if the key was not bound there."""
        rows = range(0, self.contraction) if rows is None else rows
        found = self._bindings.get((rows.start, rows.stop))
        if found is None:
            raise KeyMismatch(f"the key is not bound to the weights over rows [{rows.start}, {rows.stop})")
        return found

    def bound(self, rows: range | None = None) -> bool:
        rows = range(0, self.contraction) if rows is None else rows
        return (rows.start, rows.stop) in self._bindings

    def unbind(self, rows: range | None = None) -> None:
        """Drop the binding over ``rows`` (every binding by default): a client that cannot hold
        them all binds again for its next call."""
        if rows is None:
            self._bindings.clear()
        else:
            self._bindings.pop((rows.start, rows.stop), None)

    @staticmethod
    def binding_bytes(params: Params, width: int) -> int:
        """``nbytes`` of one binding of ``width`` output columns: N integers of Z per column, 4
        bytes each while |z| <= the weights' L1 norm fits 31 bits."""
        return width * params.n * _z_bytes(params.w_l1.bit_length() + 1)

    @staticmethod
    def bytes_for(params: Params, contraction: int, width: int) -> int:
        """``nbytes`` of a key for ``params`` bound over all its rows: the seed and one binding."""
        return SEED_BYTES + SharedMaskKey.binding_bytes(params, width)

    @property
    def nbytes(self) -> int:
        """Bytes of secret state: the seed and every binding kept."""
        return SEED_BYTES + sum(b.nbytes for b in self._bindings.values())

    def __repr__(self) -> str:
        return f"SharedMaskKey(id={self.key_id.hex()}, n={self.params.n}, features={self.contraction})"

    def __reduce__(self):
        raise TypeError("a SharedMaskKey is never serialised implicitly")


def encrypt(sk: SharedMaskKey, x: torch.Tensor | np.ndarray) -> Ciphertext:
    p = sk.params
    xm = _as_int_matrix(x, "activations")
    check_range(xm, p.x_bits)
    n, (tokens, d) = p.n, xm.shape
    if d != sk.contraction:
        raise KeyMismatch(f"key has {sk.contraction} secrets, activations have {d} features")
    blocks = -(-tokens // n)
    out = np.empty((blocks, d, n), dtype=np.int64)
    seeds = tuple(fresh_seed() for _ in range(blocks))
    limbs = limb_count(p.log_q)
    secrets = sk.secrets()  # evaluated a tile of features at a time: one forward FFT each per block
    for b, seed in enumerate(seeds):
        a_eval = sk.ring.evaluate(expand_mask(seed, n=n, rows=1), p.log_q)  # (limbs, 1, n/2)

        def products(r0: int, r1: int, a_eval: np.ndarray = a_eval) -> np.ndarray:
            f = scratch("evals", (limbs, r1 - r0, n // 2), np.complex128)
            s_eval = _evaluations(sk.ring, secrets[r0:r1], _SECRET_BITS, _SECRET_BITS, "secrets")[0]  # one limb: exact
            np.multiply(a_eval, s_eval, out=f)
            return sk.ring.inverse(f)

        encrypt_rows(sk.ring, p, block_view(xm, n, b), products, out[b])
    clear_padding(out, tokens)
    return Ciphertext(params=p, key_id=fresh_label(sk.key_id), tokens=tokens, first_row=0, seeds=seeds, words=out)


def decrypt(sk: SharedMaskKey, res: MatmulResult, *, rows: range | None = None, columns: range | None = None) -> torch.Tensor:
    """The product over contraction ``rows`` (all by default; the key must be bound there) and
    output ``columns`` (all of the binding's by default), as a chunk of a call returns it."""
    p, kp = res.params, sk.params
    check_label(sk.key_id, res.key_id)
    if (p.n, p.log_q, p.delta, p.profile) != (kp.n, kp.log_q, kp.delta, kp.profile):
        raise KeyMismatch("result parameters (N, q, delta, profile) differ from the key's")
    binding = sk.binding(rows)
    columns = range(0, binding.width) if columns is None else columns
    if not 0 <= columns.start <= columns.stop <= binding.width or columns.step != 1:
        raise ShapeMismatch(f"columns [{columns.start}, {columns.stop}) are not within the layer's {binding.width}")
    if res.d_out != len(columns):
        raise KeyMismatch(f"result has {res.d_out} columns, {len(columns)} were asked for")
    z = binding.z[columns.start : columns.stop]
    n, bits = p.n, binding.limb_bits
    levels = limb_count(p.log_q, bits)  # shift bits * level >= log_q vanishes mod q
    y = np.empty((res.blocks * n, res.d_out), dtype=np.int64)
    for b, seed in enumerate(res.seeds):
        a_eval = sk.ring.evaluate(expand_mask(seed, n=n, rows=1), p.log_q, bits)  # (levels, 1, n/2)

        def products(r0: int, r1: int, a_eval: np.ndarray = a_eval) -> np.ndarray:
            z_eval = _evaluations(sk.ring, z[r0:r1], binding.z_bits, bits, "z")  # (z limbs, rows, n/2)
            f = scratch("evals", (levels, r1 - r0, n // 2), np.complex128)
            term = scratch("term", (r1 - r0, n // 2), np.complex128)
            f[:] = 0
            for m in range(z_eval.shape[0]):
                for lvl in range(m, levels):
                    f[lvl] += np.multiply(z_eval[m], a_eval[lvl - m], out=term)
            return sk.ring.inverse(f)

        # out_bits_a = log_q: the product a * z_k is already at full scale
        decrypt_rows(sk.ring, p, bits, p.log_q, res.b_words[b], products, y[b * n : (b + 1) * n].T)
    return torch.from_numpy(y[: res.tokens])
