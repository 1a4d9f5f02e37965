"""Hole punching: a relayed connection upgraded to a direct one (DCUtR, libp2p/specs relay/DCUtR.md).

py-libp2p 0.8.1's `DCUtRProtocol` does the exchange (CONNECT with each side's predicted public
address, SYNC, then both sides dial at once from their listen port: TCP simultaneous open). Used
as it ships, it would let any peer steer this node's dials: its loop punches every relayed peer
on its own, a CONNECT may list 20 addresses of the sender's choosing, the answering side dials
them all for three rounds in as many concurrent sessions as streams are opened, and a session
may arrive on a direct connection, where it has nothing to upgrade. `HolePuncher` keeps the
exchange and bounds the rest:

- it punches only when this node asks (`upgrade_soon`, after each relayed dial of its own) and
  only with a listen address another machine could reach (not loopback);
- it answers a session only on a relayed connection, one at a time per peer, MAX_SESSIONS at
  once in all, and MAX_ANSWERS per peer for as long as it remembers the peer (MAX_PEERS);
- every punch dials at most MAX_PUNCH_ADDRS addresses, and never a loopback, unspecified,
  multicast or link-local one.

It punches once the relayed connection is idle (no stream open but pubsub's and identify's, which
live as long as it does), and closes it once the direct one stands and it is idle again
(py-libp2p closes it after a fixed 60 s, requests in flight or not; the
swarm's own trimming to one connection per peer may close it sooner): a request in flight on a
closed connection is reset and sent again, which costs its upload twice.
"""

from __future__ import annotations

import ipaddress
import logging
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.peer.id import ID
from libp2p.relay.circuit_v2.dcutr import DCUtRProtocol
from multiaddr import Multiaddr

from .relay import is_circuit

log = logging.getLogger(__name__)

MAX_SESSIONS = 8
"""Hole-punching sessions answered at once, all peers together."""
MAX_ANSWERS = 3
"""Sessions answered per peer (py-libp2p's own MAX_HOLE_PUNCH_ATTEMPTS for the asking side)."""
MAX_PEERS = 1024
"""Peers whose answered sessions are counted (the least recent are forgotten first)."""
MAX_PUNCH_ADDRS = 4
"""Distinct addresses one punch dials."""
IDLE_S = 0.5
"""How long a relayed connection must have been idle (no `_busy` stream) before it is upgraded."""
LIFELONG_PROTOCOLS = ("/meshsub/", "/floodsub/", "/ipfs/id/", "/libp2p/dcutr")
"""Streams kept open for a connection's whole life (pubsub's, identify's) or the punch's own: they
do not make a connection busy, and their owners open them again on the direct connection."""
WAIT_IDLE_S = 600.0
"""Longest wait for an idle moment; a connection never idle that long stays relayed."""
DIAL_TIMEOUT_S = 5


def _tcp_ip(addr: Multiaddr) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP of a direct TCP address (/ip4 or /ip6, then /tcp), else None."""
    parts = [p.name for p in addr.protocols()]
    if is_circuit(addr) or len(parts) < 2 or parts[0] not in ("ip4", "ip6") or parts[1] != "tcp":
        return None
    try:
        return ipaddress.ip_address(addr.value_for_protocol(parts[0]))
    except ValueError:
        return None


def dialable(addr: Multiaddr) -> bool:
    """Whether a punch may dial `addr`: TCP to an address of another machine, not a relay's."""
    ip = _tcp_ip(addr)
    return ip is not None and not (ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local)


def _listens_beyond_loopback(addr: Multiaddr) -> bool:
    ip = _tcp_ip(addr)
    return ip is not None and not ip.is_loopback


def _busy(conn: INetConn) -> bool:
    """Whether a stream other than a lifelong one is open on `conn` (a request, a DHT query)."""
    return any(not str(stream.get_protocol() or "").startswith(LIFELONG_PROTOCOLS) for stream in conn.get_streams())


def _is_relayed(conn: INetConn) -> bool:
    addrs = conn.get_transport_addresses()
    return bool(addrs) and all(is_circuit(a) for a in addrs)


class HolePuncher(DCUtRProtocol):
    """py-libp2p's DCUtR, driven by this node and bounded against hostile peers (module docstring)."""

    def __init__(self, host: IHost) -> None:
        super().__init__(host, dial_timeout=DIAL_TIMEOUT_S)
        self._answering = 0
        self._answered: OrderedDict[ID, int] = OrderedDict()
        self._dialed: dict[ID, set[str]] = {}  # per punch in progress: the addresses dialed so far
        self.upgraded = 0  # relayed connections this node turned direct, either side

    # -- asking ------------------------------------------------------------------------------

    def can_punch(self) -> bool:
        """Whether this node listens where another machine could reach it, on an address of its own
        or on all of them (0.0.0.0): a punch dials from its listen port."""
        return any(_listens_beyond_loopback(a) for a in self.host.get_addrs())

    def upgrade_soon(self, peer: ID) -> None:
        """Try to turn the relayed connection to `peer` into a direct one, in the background, once
        it has been idle for IDLE_S. Does nothing before the service runs or without a reachable
        listen address."""
        if self._nursery is None or not self.can_punch():
            return
        self._nursery.start_soon(self._upgrade_when_idle, peer)

    async def _upgrade_when_idle(self, peer: ID) -> None:
        network = self.host.get_network()
        with trio.move_on_after(WAIT_IDLE_S):
            idle_since = trio.current_time()
            while True:
                conns = network.get_connections(peer)
                if not conns or not all(_is_relayed(c) for c in conns):
                    return  # gone, or direct already
                if any(_busy(c) for c in conns):
                    idle_since = trio.current_time()
                elif trio.current_time() - idle_since >= IDLE_S:
                    break
                await trio.sleep(0.1)
            if await self.initiate_hole_punch(peer):
                log.info("direct connection to %s: its relay is left once idle", peer)
            else:
                log.info("hole punching to %s failed: staying on its relay", peer)

    async def _auto_drive_loop(self) -> None:
        """py-libp2p punches every relayed peer on its own; here only `upgrade_soon` does."""

    # -- answering ---------------------------------------------------------------------------

    async def _handle_dcutr_stream(self, stream: INetStream) -> None:
        peer = stream.muxed_conn.peer_id
        conn = next((c for c in self.host.get_network().get_connections(peer) if c.muxed_conn is stream.muxed_conn), None)
        refused = ("not on a relayed connection" if conn is None or not _is_relayed(conn) else
                   "one session at a time per peer" if peer in self._in_progress else
                   f"{MAX_SESSIONS} sessions at once" if self._answering >= MAX_SESSIONS else
                   f"{MAX_ANSWERS} sessions per peer" if self._answered.get(peer, 0) >= MAX_ANSWERS else None)
        if refused is not None:
            log.info("refused a hole-punching session from %s: %s", peer, refused)
            await stream.reset()
            return
        self._answered[peer] = self._answered.get(peer, 0) + 1
        self._answered.move_to_end(peer)
        while len(self._answered) > MAX_PEERS:
            self._answered.popitem(last=False)
        self._answering += 1
        try:
            await super()._handle_dcutr_stream(stream)
        finally:
            self._answering -= 1

    # -- dialing, either side ----------------------------------------------------------------

    @contextmanager
    def _dials(self, peer: ID) -> Iterator[None]:
        """Count the addresses dialed to `peer` from here to the end of the block."""
        self._dialed[peer] = set()
        try:
            yield
        finally:
            self._dialed.pop(peer, None)

    async def _try_unilateral_upgrade(self, peer_id: ID) -> bool:
        with self._dials(peer_id):
            return await super()._try_unilateral_upgrade(peer_id)

    async def _perform_hole_punch(self, peer_id: ID, addrs: list[Multiaddr], as_responder: bool = False) -> bool:
        with self._dials(peer_id):
            ok = await super()._perform_hole_punch(peer_id, addrs, as_responder)
        self.upgraded += ok
        return ok

    async def _dial_peer(self, peer_id: ID, addr: Multiaddr, source: tuple[str, int] | None = None,
                         as_responder: bool = False) -> None:
        """The one place every punch dial passes: only dialable addresses, MAX_PUNCH_ADDRS per punch."""
        if not dialable(addr):
            return
        dialed = self._dialed.get(peer_id)
        if dialed is None or str(addr) not in dialed and len(dialed) >= MAX_PUNCH_ADDRS:
            return  # not within a punch (every path of py-libp2p's is), or past the cap
        dialed.add(str(addr))
        await super()._dial_peer(peer_id, addr, source, as_responder)

    def _decode_observed_addrs(self, addr_bytes: list[bytes]) -> list[Multiaddr]:
        return [a for a in super()._decode_observed_addrs(addr_bytes) if dialable(a)][:MAX_PUNCH_ADDRS]

    def _schedule_relay_close(self, peer_id: ID) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self._close_relayed_when_idle, peer_id)

    async def _close_relayed_when_idle(self, peer: ID) -> None:
        """Close `peer`'s relayed connections as each becomes idle, while a direct one stands."""
        network = self.host.get_network()
        with trio.move_on_after(WAIT_IDLE_S):
            while await self._verify_direct_connection(peer):
                relayed = [c for c in network.get_connections(peer) if _is_relayed(c)]
                if not relayed:
                    return
                for conn in relayed:
                    if not _busy(conn):
                        await conn.close()
                await trio.sleep(0.1)
