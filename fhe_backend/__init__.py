"""Encrypted x @ W for untrusted providers: keys, encryption, provider matmul, decryption, checks.

Quick start::

    from cipherswarm.fhe_backend import get_backend
    be = get_backend("rlwe")
    params = be.params_for(w, x_bits=8)
    sk = be.keygen(params)
    out = be.matmul(type(ct := be.encrypt(sk, x)).from_bytes(ct.to_bytes()), w)
    assert torch.equal(be.decrypt(sk, out), x @ w)
"""

from .backend import Backend, available_backends, get_backend
from .ciphertext import Ciphertext, MatmulResult
from .errors import (
    BackendUnavailable,
    FheError,
    InputRangeError,
    InvalidCiphertext,
    KeyMismatch,
    ParameterError,
    ShapeMismatch,
    VerificationFailed,
)
from .weights import PlainWeights
from .keys import SecretKey
from .params import Params, WeightStats, choose_params

__all__ = [
    "Backend", "available_backends", "get_backend", "Ciphertext", "MatmulResult", "BackendUnavailable",
    "FheError", "InputRangeError", "InvalidCiphertext", "KeyMismatch", "ParameterError", "ShapeMismatch",
    "VerificationFailed", "PlainWeights", "SecretKey", "Params", "WeightStats", "choose_params",
]
