"""The default backend: secret-key RLWE with the ring along the token axis (see README.md)."""

from __future__ import annotations

import torch

from .ciphertext import Ciphertext, MatmulResult
from .encryptor import decrypt, encrypt
from .evaluator import PlainWeights, matmul
from .keys import SecretKey
from .params import Params, WeightStats, choose_params


class RlweBackend:
    """Exact encrypted ``x @ w``: the provider's work is float64 GEMMs on limbs, the client's FFTs."""

    name = "rlwe"
    Ciphertext = Ciphertext
    Result = MatmulResult

    def params_for(
        self,
        w: "torch.Tensor | PlainWeights",
        x_bits: int = 8,
        *,
        transpose: bool = False,
        n: int | None = None,
        switch_output: bool = True,
    ) -> Params:
        stats = w.stats(transpose) if isinstance(w, PlainWeights) else WeightStats.of(w, transpose=transpose)
        return choose_params(stats, x_bits, n=n, switch_output=switch_output)

    def keygen(self, params: Params) -> SecretKey:
        return SecretKey.generate_key(params)

    def encrypt(self, sk: SecretKey, x: torch.Tensor) -> Ciphertext:
        return encrypt(sk, x)

    def matmul(
        self, ct: Ciphertext, w: "torch.Tensor | PlainWeights", *, transpose: bool = False, method: str = "f64"
    ) -> MatmulResult:
        return matmul(ct, w, transpose=transpose, method=method)

    def decrypt(self, sk: SecretKey, out: MatmulResult) -> torch.Tensor:
        return decrypt(sk, out)
