"""libp2p provider and client nodes: discovery, scheduling, verification, bans and the ledger.

README.md beside this file describes the processes and how they find and check each other.
Names are imported on first use (PEP 562), so that `cipherswarm identity` and other light
commands do not pay for torch and the encryption engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ChunkFailedError": ".errors",
    "ClientClosedError": ".errors",
    "NodeError": ".errors",
    "NoProvidersError": ".errors",
    "ProvidersCheatingError": ".errors",
    "ClientConfig": ".client",
    "SwarmClient": ".client",
    "SwarmSession": ".client",
    "open_session": ".client",
    "NodeHost": ".host",
    "open_host": ".host",
    "IdentityError": ".identity",
    "default_identity_path": ".identity",
    "load_identity": ".identity",
    "Ledger": ".ledger",
    "Cheat": ".provider",
    "Provider": ".provider",
    "ProviderConfig": ".provider",
    "ClientStats": ".types",
    "PeerView": ".types",
    "ProviderAdvert": ".types",
    "ProviderStats": ".types",
    "ModelMismatchError": ".weights",
    "ModelWeights": ".weights",
    "WeightsError": ".weights",
    "load_model": ".weights",
}

if TYPE_CHECKING:
    from .client import ClientConfig, SwarmClient, SwarmSession, open_session
    from .errors import ChunkFailedError, ClientClosedError, NodeError, NoProvidersError, ProvidersCheatingError
    from .host import NodeHost, open_host
    from .identity import IdentityError, default_identity_path, load_identity
    from .ledger import Ledger
    from .provider import Cheat, Provider, ProviderConfig
    from .types import ClientStats, PeerView, ProviderAdvert, ProviderStats
    from .weights import ModelMismatchError, ModelWeights, WeightsError, load_model


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)


__all__ = sorted(_EXPORTS)
