"""The client side of a node: discovery, scheduling, verification, bans, ledger, and the API."""

from .api import SwarmClient
from .config import ClientConfig
from .session import SwarmSession, open_session

__all__ = ["ClientConfig", "SwarmClient", "SwarmSession", "open_session"]
