"""libp2p provider and client nodes: discovery, scheduling, verification, bans and the ledger.

README.md beside this file describes the processes and how they find and check each other.
"""

from .client import ClientConfig, SwarmClient, SwarmSession, open_session
from .errors import ChunkFailedError, ClientClosedError, NodeError, NoProvidersError, ProvidersCheatingError
from .host import NodeHost, open_host
from .identity import IdentityError, default_identity_path, load_identity
from .ledger import Ledger
from .provider import Cheat, Provider, ProviderConfig
from .types import ClientStats, PeerView, ProviderAdvert, ProviderStats
from .weights import ModelWeights, WeightsError, load_model

__all__ = [
    "Cheat",
    "ChunkFailedError",
    "ClientClosedError",
    "ClientConfig",
    "ClientStats",
    "IdentityError",
    "Ledger",
    "ModelWeights",
    "NoProvidersError",
    "NodeError",
    "NodeHost",
    "PeerView",
    "Provider",
    "ProviderAdvert",
    "ProviderConfig",
    "ProviderStats",
    "ProvidersCheatingError",
    "SwarmClient",
    "SwarmSession",
    "WeightsError",
    "default_identity_path",
    "load_identity",
    "load_model",
    "open_host",
    "open_session",
]
