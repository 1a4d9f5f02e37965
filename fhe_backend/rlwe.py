"""The default backend: secret-key RLWE with the ring along the token axis (see README.md)."""

from __future__ import annotations

import torch

from .ciphertext import Ciphertext, MatmulResult
from .encryptor import decrypt, encrypt
from .evaluator import matmul
from .keys import SecretKey
from . import shared_mask
from .errors import ParameterError
from .params import Params, WeightStats, choose_params
from .shared_mask import SharedMaskKey
from .weights import PlainWeights, contraction_width


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
        self, params: Params, *, weights: "torch.Tensor | PlainWeights | None" = None, transpose: bool = False,
        contraction: int | None = None,
    ) -> "SecretKey | SharedMaskKey":
        """A fresh key. The shared-mask profile's key has a secret per contraction row: given the
        layer's ``weights`` it is made and bound to them at once, given only ``contraction`` it is
        made unbound (``SharedMaskKey.bind`` before decrypting)."""
        if params.shared_mask:
            if weights is None and contraction is None:
                raise ParameterError("the shared-mask profile needs the layer's weights (weights=...) or its contraction width")
            if weights is None:
                return SharedMaskKey.generate_key(params, contraction)
            pw = PlainWeights.of(weights)
            sk = SharedMaskKey.generate_key(params, contraction_width(pw, transpose)[0])
            sk.bind(pw, transpose=transpose)
            return sk
        return SecretKey.generate_key(params)

    def encrypt(self, sk: "SecretKey | SharedMaskKey", x: torch.Tensor) -> Ciphertext:
        return shared_mask.encrypt(sk, x) if isinstance(sk, SharedMaskKey) else encrypt(sk, x)

    def matmul(
        self, ct: Ciphertext, w: "torch.Tensor | PlainWeights", *, transpose: bool = False, method: str = "f64"
    ) -> MatmulResult:
        return matmul(ct, w, transpose=transpose, method=method)

    def decrypt(
        self, sk: "SecretKey | SharedMaskKey", out: MatmulResult, *, rows: range | None = None, columns: range | None = None
    ) -> torch.Tensor:
        """``rows`` and ``columns``: the contraction rows and output columns of the layer the
        product covers, which a shared-mask key needs to pick its binding; a default key needs neither."""
        if isinstance(sk, SharedMaskKey):
            return shared_mask.decrypt(sk, out, rows=rows, columns=columns)
        return decrypt(sk, out)
