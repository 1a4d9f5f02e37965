"""The default backend: secret-key RLWE with the ring along the token axis (see README.md)."""

from __future__ import annotations

import torch

from .ciphertext import Ciphertext, MatmulResult
from .encryptor import decrypt, encrypt
from .evaluator import matmul
from .keys import SecretKey
from . import shared_mask
from .errors import ParameterError
from .params import SHARED_MASK, Params, WeightStats, choose_params
from .shared_mask import SharedMaskKey
from .weights import PlainWeights


class RlweBackend:
    """Exact encrypted ``x @ w``: the provider's work is float64 GEMMs on limbs, the client's FFTs."""

    name = "rlwe"
    Ciphertext = Ciphertext
    Result = MatmulResult

    def params_for(
        self,
        w: "torch.Tensor | PlainWeights | WeightStats",
        x_bits: int = 8,
        *,
        transpose: bool = False,
        n: int | None = None,
        switch_output: bool = True,
        profile: str = "default",
    ) -> Params:
        """``profile="shared-mask"`` halves the provider's work and output bytes (see shared_mask.py).
        ``w`` may be the norms alone (``WeightStats`` of the product's direction): a node that does
        not hold a layer chooses its parameters from the layer's summary."""
        if isinstance(w, WeightStats):
            stats = w
        else:
            stats = w.stats(transpose) if isinstance(w, PlainWeights) else WeightStats.of(w, transpose=transpose)
        return choose_params(stats, x_bits, n=n, switch_output=switch_output, profile=profile)

    def keygen(
        self, params: Params, *, weights: "torch.Tensor | PlainWeights | None" = None, transpose: bool = False
    ) -> "SecretKey | SharedMaskKey":
        """A fresh key; the shared-mask profile binds its key to the layer's ``weights``."""
        if params.profile == SHARED_MASK:
            if weights is None:
                raise ParameterError("the shared-mask profile needs the layer's weights at keygen (weights=...)")
            return SharedMaskKey.generate_key(params, weights, transpose=transpose)
        return SecretKey.generate_key(params)

    def encrypt(self, sk: "SecretKey | SharedMaskKey", x: torch.Tensor) -> Ciphertext:
        return shared_mask.encrypt(sk, x) if isinstance(sk, SharedMaskKey) else encrypt(sk, x)

    def matmul(
        self, ct: Ciphertext, w: "torch.Tensor | PlainWeights", *, transpose: bool = False, method: str = "f64"
    ) -> MatmulResult:
        return matmul(ct, w, transpose=transpose, method=method)

    def decrypt(self, sk: "SecretKey | SharedMaskKey", out: MatmulResult) -> torch.Tensor:
        return shared_mask.decrypt(sk, out) if isinstance(sk, SharedMaskKey) else decrypt(sk, out)
