"""The provider side of a node: serves encrypted matmuls for the layers it holds."""

from .cheat import Cheat
from .service import Provider, ProviderConfig, resolve_device

__all__ = ["Cheat", "Provider", "ProviderConfig", "resolve_device"]
