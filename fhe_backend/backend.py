"""One small interface for every encrypted-matmul backend, chosen by name.

``get_backend("rlwe")`` (default, ours), ``"clear"`` (plain integer reference with the same API),
``"zama-glwe"`` (concrete-ml-extensions, optional) and ``"concrete"`` (concrete-python TFHE, optional).
"""

from __future__ import annotations

import importlib
from typing import Any, Protocol, runtime_checkable

import torch

from .errors import BackendUnavailable


@runtime_checkable
class Backend(Protocol):
    """What a client and a provider need from an encryption scheme for ``x @ w``."""

    name: str

    def params_for(self, w: torch.Tensor, x_bits: int = 8, *, transpose: bool = False) -> Any:
        """Secure, exact parameters for products with ``w`` (or ``w.T``) and ``x_bits``-bit inputs."""

    def keygen(self, params: Any) -> Any:
        """A fresh secret key for ``params`` (client only)."""

    def encrypt(self, sk: Any, x: torch.Tensor) -> Any:
        """Encrypt integer activations (tokens x d); the result has ``to_bytes``/``from_bytes``."""

    def matmul(self, ct: Any, w: torch.Tensor, *, transpose: bool = False) -> Any:
        """Provider side: encrypted ``x @ w`` (or ``x @ w.T``), without any key."""

    def decrypt(self, sk: Any, out: Any) -> torch.Tensor:
        """The int64 product (tokens x d_out)."""


_REGISTRY = {
    "rlwe": ("cipherswarm.fhe_backend.rlwe", "RlweBackend"),
    "clear": ("cipherswarm.fhe_backend.clear", "ClearBackend"),
    "zama-glwe": ("cipherswarm.fhe_backend.zama", "ZamaGlweBackend"),
    "concrete": ("cipherswarm.fhe_backend.concrete", "ConcreteBackend"),
}


def available_backends() -> list[str]:
    """Names of the backends whose dependencies import on this machine."""
    names = []
    for name in _REGISTRY:
        try:
            get_backend(name)
        except BackendUnavailable:
            continue
        names.append(name)
    return names


def get_backend(name: str = "rlwe") -> Backend:
    """The backend called ``name``; :class:`BackendUnavailable` says which extra to install."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(_REGISTRY)}")
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(module), cls)()
