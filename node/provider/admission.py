"""Who may hold what at a provider, and for how long: bounded pools of streams.

A provider's streams pass through three pools (service.py; protocol README, section 8), so that no
stage can starve another:

- *opening*: streams still reading their header, not yet authenticated. Short-lived (the header
  deadline), never holding a compute place. When it is full a new stream evicts the oldest one: an
  honest header arrives in milliseconds, so the oldest opener is the one trickling.
- *places*: authenticated requests whose payload is read, queued or computed, `slots + queue` of
  them; a newcomer over a share is refused (BUSY). When all are taken, a newcomer takes the place
  of a request whose payload lags behind the minimum rate (service.py, LAG_SLACK_S) (an honest upload
  runs ahead of it), else it is refused: authenticated tricklers cannot keep every place.
- *acks*: replies sent, waiting for the countersigned receipt. When full, the oldest waiter is
  dropped: an ack is a courtesy the provider can lose.

Beside the pools, a `Credit` bounds the work each client identity has been given and not yet
acknowledged with a countersigned receipt, so that a client that never pays gets little.

Each pool caps the holders of one peer id and of one network address (an IPv4 address, or an IPv6
/64, the block one subscriber usually gets). Loopback addresses can be exempted: every local peer
shares 127.0.0.1, so a cap per address would only lump unrelated local processes together (the
tests' peers, a local client and provider), and a local attacker has other means anyway.
"""

from __future__ import annotations

import ipaddress
import itertools
import math
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import trio
from libp2p.peer.id import ID


def remote_address(stream: Any) -> tuple[str, int] | None:
    """The (host, port) of a libp2p stream's connection, or None if the transport does not say."""
    try:
        address = stream.get_remote_address()
    except Exception:  # noqa: BLE001  # a transport without addresses, or one already torn down
        return None
    return address if isinstance(address, tuple) and address else None


def address_key(address: tuple[str, int] | None, *, exempt_loopback: bool) -> str | None:
    """What a per-address cap counts a connection from `address` under: its IPv4 address (an
    IPv4-mapped IPv6 address is one), the /64 of an IPv6 address, or None (counted under no
    address) for an unknown address or, if `exempt_loopback`, a loopback one."""
    if address is None:
        return None
    try:
        ip = ipaddress.ip_address(address[0])
    except ValueError:
        return str(address[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if exempt_loopback and ip.is_loopback:
        return None
    if isinstance(ip, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Ticket:
    """A place in a Pool. Do the work it admits inside `scope`, which is cancelled if the pool
    evicts the ticket (then `evicted` is set and the place is already given back); `release` gives
    the place back (idempotent)."""

    __slots__ = ("_pool", "_id", "peer", "address", "scope", "evicted")

    def __init__(self, pool: Pool, ticket_id: int, peer: ID, address: str | None) -> None:
        self._pool = pool
        self._id = ticket_id
        self.peer = peer
        self.address = address
        self.scope = trio.CancelScope()
        self.evicted = False

    def release(self) -> None:
        self._pool._release(self._id)

    def __enter__(self) -> Ticket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class Pool:
    """At most `capacity` tickets, `per_peer` of them held by one peer id and `per_address` by one
    address key (None: no cap). Over a share, `enter` refuses; over the capacity it refuses too,
    unless `evict_oldest`, when the oldest ticket is evicted to make room."""

    def __init__(
        self, name: str, *, capacity: int, per_peer: int | None = None, per_address: int | None = None,
        evict_oldest: bool = False,
    ) -> None:
        if capacity < 1 or (per_peer is not None and per_peer < 1) or (per_address is not None and per_address < 1):
            raise ValueError(f"{name}: capacity and shares must be at least 1")
        self.name = name
        self.capacity = capacity
        self.per_peer = per_peer
        self.per_address = per_address
        self.evict_oldest = evict_oldest
        self.evictions = 0  # tickets evicted so far
        self.refusals = 0  # tickets refused so far
        self._tickets: dict[int, Ticket] = {}  # oldest first
        self._peers: Counter[ID] = Counter()
        self._addresses: Counter[str] = Counter()
        self._ids = itertools.count()

    def __len__(self) -> int:
        return len(self._tickets)

    def held_by(self, peer: ID) -> int:
        return self._peers[peer]

    def held_at(self, address: str) -> int:
        return self._addresses[address]

    def enter(self, peer: ID, address: str | None, *, evictable: Callable[[Ticket], bool] | None = None) -> Ticket | None:
        """A ticket for `peer` connected from `address` (an address_key), or None if refused. Over
        the capacity, the oldest ticket is evicted if `evict_oldest`, else the oldest one that
        `evictable` accepts, if any."""
        over_share = (self.per_peer is not None and self._peers[peer] >= self.per_peer) or (
            address is not None and self.per_address is not None and self._addresses[address] >= self.per_address
        )
        victim = None
        if not over_share and len(self._tickets) >= self.capacity:
            victim = next((t for t in self._tickets.values() if self.evict_oldest or (evictable and evictable(t))), None)
        if over_share or (len(self._tickets) >= self.capacity and victim is None):
            self.refusals += 1
            return None
        if victim is not None:
            self._release(victim._id)
            victim.evicted = True
            victim.scope.cancel()
            self.evictions += 1
        ticket = Ticket(self, next(self._ids), peer, address)
        self._tickets[ticket._id] = ticket
        self._peers[peer] += 1
        if address is not None:
            self._addresses[address] += 1
        return ticket

    def _release(self, ticket_id: int) -> None:
        ticket = self._tickets.pop(ticket_id, None)
        if ticket is None:
            return
        self._peers[ticket.peer] -= 1
        if not self._peers[ticket.peer]:
            del self._peers[ticket.peer]
        if ticket.address is not None:
            self._addresses[ticket.address] -= 1
            if not self._addresses[ticket.address]:
                del self._addresses[ticket.address]


class Credit:
    """Work a provider has done for each client identity that the client has not acknowledged yet
    (protocol README, section 8, "Credit"): at most `count` requests and `macs` multiply-accumulates
    per peer id, counted from admission until the countersigned receipt arrives, or, if it never
    does, until `hold_s` after the reply was sent (its receipt's deadline). A client that never
    countersigns thus gets at most `count` requests (and `macs` of work) per `hold_s`, whoever
    else is served. A request is always within the credit when its peer has nothing outstanding,
    so one request larger than `macs` can still be served.

    Memory: one entry per admitted or unacknowledged request, each dropped at its deadline; the
    deadlines are kept in a queue in the order they were set (all are `hold_s` from then)."""

    def __init__(self, *, count: int, macs: int, hold_s: float) -> None:
        if count < 1 or macs < 1 or hold_s <= 0:
            raise ValueError("credit: count, macs and hold_s must be positive")
        self.count = count
        self.macs = macs
        self.hold_s = hold_s
        self.refusals = 0  # requests refused for want of credit so far
        self._held: dict[ID, dict[int, tuple[int, float]]] = {}  # peer -> {entry: (macs, deadline or inf)}
        self._deadlines: deque[tuple[float, ID, int]] = deque()  # (when, peer, entry), oldest first
        self._ids = itertools.count()

    def outstanding(self, peer: ID) -> tuple[int, int]:
        """(requests, multiply-accumulates) of `peer` not yet acknowledged."""
        held = self._held.get(peer, {})
        return len(held), sum(macs for macs, _ in held.values())

    def take(self, peer: ID, macs: int, *, now: float) -> int | None:
        """An entry for a request of `macs` by `peer`, or None if it is over its credit."""
        self._expire(now)
        count, owed = self.outstanding(peer)
        if count and (count >= self.count or owed + macs > self.macs):
            self.refusals += 1
            return None
        entry = next(self._ids)
        self._held.setdefault(peer, {})[entry] = (macs, math.inf)
        return entry

    def retry_s(self, peer: ID, *, now: float) -> float:
        """Seconds until `peer`'s first unacknowledged reply reaches its deadline (inf while all its
        requests are still being computed, 0 if it has none)."""
        return min((deadline for _, deadline in self._held.get(peer, {}).values()), default=now) - now

    def load(self, *, now: float) -> float:
        """The largest share of its credit (requests or MACs) any one peer holds: 1 when one is at
        its cap, which counts as saturation for the provider's price (pricing.py)."""
        self._expire(now)
        return max((max(len(held) / self.count, sum(macs for macs, _ in held.values()) / self.macs)
                    for held in self._held.values()), default=0.0)

    def settle(self, peer: ID, entry: int, *, now: float) -> None:
        """The reply carrying the receipt for `entry` was sent: hold it until `hold_s` from now."""
        held = self._held.get(peer, {})
        if entry in held:
            held[entry] = (held[entry][0], now + self.hold_s)
            self._deadlines.append((now + self.hold_s, peer, entry))

    def release(self, peer: ID, entry: int) -> None:
        """`entry` is acknowledged, or no receipt was issued for it (idempotent)."""
        held = self._held.get(peer)
        if held is not None:
            held.pop(entry, None)
            if not held:
                del self._held[peer]

    def _expire(self, now: float) -> None:
        while self._deadlines and self._deadlines[0][0] <= now:
            _, peer, entry = self._deadlines.popleft()
            self.release(peer, entry)
