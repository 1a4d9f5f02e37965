"""What the dashboard shows: one immutable snapshot of a node, and the JSON the page reads.

A snapshot is built from records the node already keeps (a client's `ClientStats` and peer table,
its ledger's receipts, the trainer's step records; a provider's `ProviderStats` and refusals), and
turned into JSON by picking named fields only: nothing reaches the page that is not listed here,
so no key, ciphertext or data sample can leak into it by a field added elsewhere.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from libp2p.peer.id import ID

from ..ledger import Ledger, NotALedger
from ..types import ClientStats, PeerView, ProviderStats

if TYPE_CHECKING:
    from ..host import NodeHost
    from ..provider.service import Provider

SPEND_REFRESH_S = 2.0
"""Least time between two reads of the client's ledger: each read decodes every receipt it holds."""


@dataclass(frozen=True, slots=True)
class StepPoint:
    """One optimizer step of the run, as the page plots it."""

    step: int
    loss: float
    eval_loss: float | None  # held-out loss measured after this step, if it was measured
    tokens_per_s: float
    bytes_sent: int  # during this step
    bytes_received: int


@dataclass(frozen=True, slots=True)
class ProviderView:
    """A provider's own figures: its offer and what it has served and refused."""

    price_per_gmac: int
    macs_per_second: int  # measured at start-up, as advertised
    layers_held: int
    layers_total: int
    stats: ProviderStats
    rejected: Mapping[str, int]  # refusals by reason (the wire error code's name)


@dataclass(frozen=True, slots=True)
class Snapshot:
    """A node as the dashboard shows it at one moment."""

    role: str  # "client" or "provider"
    taken_at: float  # Unix time
    uptime_s: float
    peers: tuple[PeerView, ...] = ()  # a client's peer table
    connected: tuple[str, ...] = ()  # a provider's connected peer ids
    client: ClientStats | None = None
    steps: tuple[StepPoint, ...] = ()
    total_steps: int | None = None
    spend: Mapping[str, int] = field(default_factory=dict)  # provider peer id -> amount paid by this run
    provider: ProviderView | None = None

    def to_json(self) -> bytes:
        """The page's view of this snapshot (module docstring: named fields only)."""
        doc: dict[str, Any] = {
            "role": self.role, "taken_at": self.taken_at, "uptime_s": self.uptime_s,
            "peers": [_peer(p) for p in self.peers], "connected": list(self.connected),
        }
        if self.client is not None:
            c = self.client
            doc["traffic"] = {name: getattr(c, name) for name in _CLIENT_FIELDS}
            doc["bans"] = dict(c.bans)
            doc["training"] = {"total_steps": self.total_steps, "steps": [_fields(s, _STEP_FIELDS) for s in self.steps]}
            doc["spend"] = dict(self.spend)
        if self.provider is not None:
            p = self.provider
            doc["provider"] = {
                "price_per_gmac": p.price_per_gmac, "macs_per_second": p.macs_per_second,
                "layers_held": p.layers_held, "layers_total": p.layers_total,
                **{name: getattr(p.stats, name) for name in _PROVIDER_FIELDS}, "rejected": dict(p.rejected),
            }
        return json.dumps(doc, allow_nan=False, separators=(",", ":")).encode()


_PEER_FIELDS = ("peer", "device", "layers", "macs_per_second", "measured_macs_per_second", "latency_s", "price_per_gmac",
                "free_slots", "reputation", "failures", "chunks", "banned", "relayed")
_CLIENT_FIELDS = ("calls", "chunks", "bytes_sent", "bytes_received", "macs", "paid", "retries", "hedges", "timeouts",
                  "busy", "verification_failures", "key_rotations")
_PROVIDER_FIELDS = ("requests", "served", "busy", "errors", "acks", "macs", "earned", "in_flight", "peak_in_flight")
_STEP_FIELDS = ("step", "loss", "eval_loss", "tokens_per_s", "bytes_sent", "bytes_received")


def _finite(value: Any) -> Any:
    """JSON has no infinity or NaN: an unmeasured figure (an infinite latency) becomes null."""
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _fields(record: Any, names: Sequence[str]) -> dict[str, Any]:
    return {name: _finite(getattr(record, name)) for name in names}


def _peer(view: PeerView) -> dict[str, Any]:
    return _fields(view, _PEER_FIELDS)


class ClientBoard:
    """Snapshots of a running client: its statistics and peer table (`stats`, e.g. SwarmClient.stats),
    the run's steps (`steps`) and what this run paid each provider, summed from the countersigned
    receipts its ledger (`ledger`) gained since the board was made. Receipts already there belong
    to earlier runs sharing the ledger and are left out. `snapshot` blocks (it calls `stats` and
    reads SQLite): call it from a worker thread."""

    def __init__(self, *, stats: Callable[[], ClientStats], ledger: str | Path, steps: Callable[[], Sequence[StepPoint]],
                 total_steps: int | None) -> None:
        self._stats = stats
        self._ledger = Path(ledger)
        self._steps = steps
        self._total_steps = total_steps
        self._started = time.monotonic()
        self._earlier = {signed.receipt.request_id for signed in self._receipts()}
        self._spend: dict[str, int] = {}
        self._spend_at = -math.inf

    def _receipts(self) -> list[Any]:
        try:
            with Ledger(self._ledger, read_only=True) as ledger:
                return ledger.receipts()
        except (FileNotFoundError, NotALedger):  # no receipt written yet
            return []

    def spend(self) -> dict[str, int]:
        """Amount per provider of this run's receipts, read again at most every SPEND_REFRESH_S."""
        now = time.monotonic()
        if now - self._spend_at >= SPEND_REFRESH_S:
            sums: Counter[str] = Counter()
            for signed in self._receipts():
                receipt = signed.receipt
                if receipt.request_id not in self._earlier:
                    sums[ID(receipt.provider).to_base58()] += receipt.amount  # as PeerView.peer names it
            self._spend, self._spend_at = dict(sums), now
        return self._spend

    def snapshot(self) -> Snapshot:
        # the ledger before the statistics: the client records a receipt, then counts it as paid in
        # the same trio step, so the spend shown never exceeds the total paid shown
        spend = self.spend()
        stats = self._stats()
        return Snapshot(role="client", taken_at=time.time(), uptime_s=time.monotonic() - self._started,
                        peers=stats.peers, client=stats, steps=tuple(self._steps()), total_steps=self._total_steps,
                        spend=spend)


def provider_snapshot(provider: Provider, node: NodeHost, *, started: float) -> Snapshot:
    """A provider's snapshot; `started` is the `time.monotonic()` it started at. Cheap and
    non-blocking: call it on the provider's own trio thread, where its counters change."""
    weights = provider.weights
    view = ProviderView(price_per_gmac=provider.config.price_per_gmac, macs_per_second=provider.macs_per_second,
                        layers_held=len(weights.held), layers_total=len(weights.layers), stats=provider.statistics(),
                        rejected=provider.rejections())
    return Snapshot(role="provider", taken_at=time.time(), uptime_s=time.monotonic() - started,
                    connected=tuple(str(peer) for peer in node.host.get_connected_peers()), provider=view)


def provider_source(provider: Provider, node: NodeHost) -> Callable[[], Awaitable[Snapshot]]:
    """The dashboard source of a provider served on its own trio loop (uptime counted from now)."""
    started = time.monotonic()

    async def snapshot() -> Snapshot:
        return provider_snapshot(provider, node, started=started)

    return snapshot
