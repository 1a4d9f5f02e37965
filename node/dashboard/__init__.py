"""A live, read-only web page of a running node: its peers, its training run or what it serves."""

from .server import Bound, Dashboard, is_loopback, serving_in_thread
from .state import ClientBoard, ProviderView, Snapshot, StepPoint, provider_snapshot, provider_source

__all__ = ["Bound", "ClientBoard", "Dashboard", "ProviderView", "Snapshot", "StepPoint", "is_loopback",
           "provider_snapshot", "provider_source", "serving_in_thread"]
