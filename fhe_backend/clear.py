"""The ``clear`` backend: the exact integer computation with the same API and checks as ``rlwe``.

It is the reference every other backend is tested against, and the trainer's ``fhe="simulate"``:
because ``rlwe`` is exact, both give bit-identical results whenever ``rlwe`` accepts the inputs, and
``clear`` refuses exactly what ``rlwe`` refuses (activation range, weight norms, parameters).
Nothing here is secret: the "ciphertext" is the plaintext.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .ciphertext import head_of, header_layouts, read_head
from .encryptor import _as_int_matrix, check_range
from .errors import InvalidCiphertext, ShapeMismatch
from .params import Params, WeightStats, choose_params
from .weights import PlainWeights, contraction_width

#: header layouts by magic, as ciphertext.py's: "CSC1" with 11 parameter words, "CSC2" with 12
_HEADS = header_layouts(b"CSC1", b"CSC2", "II")


def exact_matmul(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Exact int64 ``x @ w``: float64 BLAS when every partial sum stays below 2^53, else int64."""
    x, w = x.to(torch.int64), w.to(torch.int64)  # abs() of an int8 -128 would stay -128
    bound = int(x.abs().max()) * int(w.abs().sum(dim=0).max()) if x.numel() and w.numel() else 0
    if bound < 1 << 53:
        return torch.round(x.to(torch.float64) @ w.to(torch.float64)).to(torch.int64)
    return x @ w


@dataclass(frozen=True, eq=False)
class ClearCiphertext:
    """Plain integer activations or products, framed like a ciphertext."""

    params: Params
    values: torch.Tensor  # (tokens, d) int64

    def to_bytes(self) -> bytes:
        t, d = self.values.shape
        magic, head = head_of(_HEADS, self.params)
        return head.pack(magic, *self.params.to_tuple(), t, d) + self.values.numpy().astype("<i8").tobytes()

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "ClearCiphertext":
        data = memoryview(data)
        params, (t, d), size = read_head(_HEADS, data, "clear ciphertext")
        if len(data) != size + 8 * t * d or t < 1 or d < 1:
            raise InvalidCiphertext("clear ciphertext has the wrong length")
        values = np.frombuffer(data[size:], dtype="<i8").reshape(t, d).astype(np.int64)
        return cls(params, torch.from_numpy(values))


@dataclass(frozen=True)
class ClearKey:
    """Stands in for a secret key: only the parameters (nothing is secret in the clear backend)."""

    params: Params


class ClearBackend:
    """Plain integer reference with the rlwe API (no encryption at all)."""

    name = "clear"
    Ciphertext = ClearCiphertext
    Result = ClearCiphertext

    def params_for(self, w: "torch.Tensor | PlainWeights", x_bits: int = 8, *, transpose: bool = False,
                   n: int | None = None, switch_output: bool = True) -> Params:
        stats = w.stats(transpose) if isinstance(w, PlainWeights) else WeightStats.of(w, transpose=transpose)
        return choose_params(stats, x_bits, n=n, switch_output=switch_output)

    def keygen(self, params: Params) -> ClearKey:
        return ClearKey(params)

    def encrypt(self, sk: ClearKey, x: torch.Tensor) -> ClearCiphertext:
        xm = _as_int_matrix(x, "activations")
        check_range(xm, sk.params.x_bits)
        return ClearCiphertext(sk.params, torch.from_numpy(xm.astype(np.int64)))

    def matmul(self, ct: ClearCiphertext, w: "torch.Tensor | PlainWeights", *, transpose: bool = False) -> ClearCiphertext:
        pw = PlainWeights.of(w)
        contraction, _ = contraction_width(pw, transpose)
        if ct.values.shape[1] != contraction:
            raise ShapeMismatch(f"activations have {ct.values.shape[1]} features, weights contract over {contraction}")
        ct.params.for_weights(pw.stats(transpose))
        return ClearCiphertext(ct.params, exact_matmul(ct.values, pw.w.t() if transpose else pw.w))

    def decrypt(self, sk: ClearKey, out: ClearCiphertext) -> torch.Tensor:
        return out.values
