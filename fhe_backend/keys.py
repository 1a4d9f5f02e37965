"""The client's secret key. It never leaves the client: it has no serialisation to the wire.

``SecretKey`` deliberately has no ``to_bytes``; :meth:`SecretKey.export_private` writes it only for a
local, private checkpoint (the caller's responsibility to protect), and pickling is refused so it
cannot ride along in a message by accident.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from dataclasses import dataclass, field

import numpy as np

from .errors import KeyMismatch
from .params import Params
from .ring import NegacyclicFFT, secret_eval_bound, ternary_eval
from .sampling import ternary_secret

KEY_ID_BYTES = 8
_LABEL_NONCE = 4  # bytes of a label that are random; the rest is the tag


def fresh_label(key_id: bytes) -> bytes:
    """The public label of one ciphertext under the key ``key_id``: 4 random bytes and a 4-byte
    HMAC-SHA256 tag of them keyed by the key's (secret) id. Every request carries a new one, so
    providers cannot link a run's requests by label, while the key's holder still tells its own
    results from another key's (:func:`label_matches`) before decrypting garbage."""
    nonce = os.urandom(_LABEL_NONCE)
    return nonce + hmac.new(key_id, nonce, hashlib.sha256).digest()[: KEY_ID_BYTES - _LABEL_NONCE]


def check_label(key_id: bytes, label: bytes) -> None:
    """KeyMismatch unless ``label`` was made by :func:`fresh_label` for the key ``key_id`` (a false
    match has probability 2^-32, and a wrong result fails its product check anyway)."""
    tag = hmac.new(key_id, label[:_LABEL_NONCE], hashlib.sha256).digest()[: KEY_ID_BYTES - _LABEL_NONCE]
    if len(label) != KEY_ID_BYTES or not hmac.compare_digest(tag, label[_LABEL_NONCE:]):
        raise KeyMismatch(f"the result (label {label.hex()}) was not encrypted under this key")


def _spectrally_bounded(evals: np.ndarray, n: int) -> bool:
    """max |s(zeta)| <= secret_eval_bound(n); the evaluations are exact to ~1e-12, far inside the margin."""
    return float(np.abs(evals).max()) <= secret_eval_bound(n)


@dataclass(frozen=True, eq=False, repr=False)
class SecretKey:
    """Ternary RLWE secret for one layer's parameters, with its FFT evaluations precomputed."""

    params: Params
    s: np.ndarray = field(repr=False)
    key_id: bytes  # random and kept secret: it keys the per-ciphertext labels (fresh_label)

    ring: NegacyclicFFT = field(init=False, repr=False)
    secret_eval: np.ndarray = field(init=False, repr=False)  # (n/2,) evaluations of s

    def __post_init__(self) -> None:
        if self.s.shape != (self.params.n,) or not np.isin(self.s, (-1, 0, 1)).all():
            raise ValueError("secret must be a ternary vector of length N")
        if len(self.key_id) != KEY_ID_BYTES:
            raise ValueError(f"key id must be {KEY_ID_BYTES} bytes")
        s8 = np.array(self.s, dtype=np.int8)  # ternary: one byte a coefficient is all a key needs to hold
        s8.setflags(write=False)
        object.__setattr__(self, "s", s8)
        ring = NegacyclicFFT(self.params.n)
        evals = ternary_eval(ring, self.s[None])[0]
        if not _spectrally_bounded(evals, self.params.n):
            raise ValueError("secret has an evaluation above ring.secret_eval_bound: decryption's error bound would not hold")
        object.__setattr__(self, "ring", ring)
        object.__setattr__(self, "secret_eval", evals)

    @classmethod
    def generate_key(cls, params: Params) -> "SecretKey":
        """A fresh uniform ternary secret from os.urandom, redrawn in the (< 2^-87) case that one of its
        evaluations exceeds ring.secret_eval_bound."""
        ring = NegacyclicFFT(params.n)
        while True:
            s = ternary_secret(params.n)
            if _spectrally_bounded(ternary_eval(ring, s[None])[0], params.n):
                return cls(params=params, s=s, key_id=os.urandom(KEY_ID_BYTES))

    @property
    def nbytes(self) -> int:
        """Bytes of key material held: the secret and its evaluations (the FFT plan is shared)."""
        return self.s.nbytes + self.secret_eval.nbytes

    @staticmethod
    def bytes_for(params: Params) -> int:
        """``nbytes`` of a key for ``params``: N int8 coefficients and N/2 complex128 evaluations."""
        return params.n + 16 * (params.n // 2)

    def __repr__(self) -> str:
        return f"SecretKey(id={self.key_id.hex()}, n={self.params.n}, log_q={self.params.log_q})"

    def __reduce__(self):
        raise TypeError("a SecretKey is never serialised implicitly; use export_private for local checkpoints")

    def export_private(self) -> dict:
        """Key material for a local private checkpoint (never for the network)."""
        return {"params": self.params.to_tuple(), "s": self.s.tobytes(), "key_id": self.key_id}

    @classmethod
    def import_private(cls, blob: dict) -> "SecretKey":
        return cls(
            params=Params.from_tuple(tuple(blob["params"])),
            s=np.frombuffer(blob["s"], dtype=np.int8),
            key_id=bytes(blob["key_id"]),
        )
