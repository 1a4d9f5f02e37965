"""Circuit relay v2 (libp2p/specs relay/circuit-v2.md) for nodes behind NAT, on py-libp2p 0.8.1.

Three roles, all on the node's one host (host.py wires them in):

- **hop** (`--relay-service`): the node relays for others, within `RelayServiceConfig`'s limits;
- **stop + reservation** (`--relay ADDR`): a node behind NAT holds a reservation on one relay at a
  time (`RelayReservation`), renews it before it expires, makes a new one when the relay is lost,
  moves to its next candidate relay when one refuses or stays unreachable, and while it holds a
  reservation names itself by its relayed address, `<relay>/p2p-circuit/p2p/<me>`;
- **dialing** (every node): 0.8.1's swarm drops every `/p2p-circuit` address before it dials, so
  a stream to a peer known only by relayed addresses could never open. `CircuitDialer` stands in
  for the swarm's `dial_peer`: direct addresses first, then each relayed one through the relay
  transport; every stream opener (matmul requests, advert fetches, the DHT) then reaches relayed
  peers unchanged.

py-libp2p's own hop and stop handlers (`CircuitV2Protocol`) do the relaying and accept relayed
connections; the reservation is ours because theirs (`CircuitV2Transport.reserve`) reports a refusal
as a bare False, and the node must say *why* a relay refused it.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import trio
from libp2p.abc import IHost, INetConn, INetStream
from libp2p.network.exceptions import SwarmException
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.relay.circuit_v2.config import RelayConfig, RelayRole
from libp2p.relay.circuit_v2.pb.circuit_pb2 import HopMessage, PeerId
from libp2p.relay.circuit_v2.protocol import PROTOCOL_ID as HOP_PROTOCOL_ID
from libp2p.relay.circuit_v2.protocol import STOP_PROTOCOL_ID, CircuitV2Protocol
from libp2p.relay.circuit_v2.protocol_buffer import StatusCode
from libp2p.relay.circuit_v2.resources import RelayLimits
from libp2p.relay.circuit_v2.transport import CircuitV2Transport
from libp2p.relay.circuit_v2.utils import read_delimited_msg, write_delimited_msg
from multiaddr import Multiaddr
from multiaddr.protocols import P_P2P, P_P2P_CIRCUIT

log = logging.getLogger(__name__)

RELAY_TIMEOUT_S = 10.0
"""Longest a reservation's round trip or a relayed dial may take."""
RETRY_MIN_S = 1.0
RETRY_MAX_S = 30.0
MAX_RELAYED_PEERS = 1024
"""Peers whose relayed addresses a node keeps (the least recently advertised go first)."""
MAX_RELAYED_ADDRS = 4
WATCH_S = 1.0
"""How often a reserving node checks that its connection to the relay still stands."""
FAILOVER_TRIES = 3
"""Failed dials in a row to one relay after which a reserving node tries its next candidate: a
restarting relay is back within them (RETRY_MIN_S, then doubling: about 7 s), one gone for good
costs the node its relayed address for no longer."""


def is_circuit(addr: Multiaddr) -> bool:
    """Whether `addr` goes through a relay (has a /p2p-circuit part)."""
    return any(p.code == P_P2P_CIRCUIT for p in addr.protocols())


def forget_failed_dial(host: IHost, peer: ID) -> None:
    """Let `peer` be dialed at once. py-libp2p 0.8.1's swarm refuses every dial to a peer for 60 s
    after one failed (its negative cache), so a relay or bootstrap peer that restarted would stay
    out of reach for a minute after it is back; callers that dial such a peer on a schedule of
    their own (with their own backoff) clear that block first."""
    host.get_network().unblock_peer(peer)  # type: ignore[attr-defined]  # the swarm's, not on INetwork


@dataclass(frozen=True, slots=True)
class RelayServiceConfig:
    """What a relay gives the peers it serves; every field bounds memory, sockets or bytes a
    hostile peer could otherwise take from it.

    Reservation TTL, slots and circuits per peer are go-libp2p's defaults. Its per-circuit limit
    (2 min, 128 KiB) is meant for hole punching only; here a relayed provider's whole traffic (MBs of
    ciphertext per request) crosses the relay, so a circuit may carry 1 GiB for an hour. A circuit
    past either limit is reset, and the client dials a new one on its next request.
    """

    slots: int = 128  # reservations held at once (0: refuse every reservation)
    reservation_ttl_s: int = 3600  # a reservation's lifetime; holders renew it before it ends
    circuits_per_peer: int = 16  # relayed connections open at once to one reserving peer
    circuit_duration_s: int = 3600  # one relayed connection's longest life
    circuit_bytes: int = 1 << 30  # bytes one relayed connection may carry, both directions together

    def __post_init__(self) -> None:
        for name, low, high in (("slots", 0, 4096), ("reservation_ttl_s", 60, 86_400),
                                ("circuits_per_peer", 1, 256), ("circuit_duration_s", 10, 86_400),
                                ("circuit_bytes", 1 << 20, 1 << 40)):
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"relay {name} must be in [{low}, {high}], got {value}")

    def limits(self) -> RelayLimits:
        return RelayLimits(duration=self.circuit_duration_s, data=self.circuit_bytes,
                           max_circuit_conns=self.circuits_per_peer, max_reservations=self.slots,
                           reservation_ttl=self.reservation_ttl_s)


class ReservationRefused(Exception):
    """The relay answered a reservation with a status other than OK."""

    def __init__(self, relay: Multiaddr, status: int) -> None:
        try:
            name = StatusCode(status).name
        except ValueError:
            name = f"status {status}"
        hint = " (its reservation slots are full)" if status == StatusCode.RESOURCE_LIMIT_EXCEEDED else ""
        super().__init__(f"relay {relay} refused the reservation: {name}{hint}")
        self.relay = relay
        self.status = status


def circuit_protocol(host: IHost, service: RelayServiceConfig | None) -> CircuitV2Protocol:
    """py-libp2p's relay protocol: the hop role only with a `service` config."""
    limits = (service or RelayServiceConfig()).limits()
    return CircuitV2Protocol(host, limits=limits, allow_hop=service is not None,
                             read_timeout=int(RELAY_TIMEOUT_S), write_timeout=int(RELAY_TIMEOUT_S))


class StopGuard:
    """Accepts relayed connections only from the relay this node holds a reservation on.

    Anyone may open a stop stream, and each accepted one becomes a connection of ours (a handshake,
    buffers, a place in the connection table), so a node without a reservation takes none, and a
    reserving node takes them only from its relay, which bounds them by its own per-peer limits.
    """

    def __init__(self, protocol: CircuitV2Protocol) -> None:
        self._protocol = protocol
        self.relay: ID | None = None

    async def handle(self, stream: INetStream) -> None:
        if self.relay is None or stream.muxed_conn.peer_id != self.relay:
            log.debug("refusing a relayed connection from %s", stream.muxed_conn.peer_id)
            await stream.reset()
            return
        await self._protocol._handle_stop_stream(stream)  # py-libp2p's own stop role, behind our check

    def install(self, host: IHost) -> None:
        """Replace the stop handler `CircuitV2Protocol.run` registered."""
        host.set_stream_handler(STOP_PROTOCOL_ID, self.handle)


class CircuitDialer:
    """The swarm's `dial_peer`, extended to relayed addresses (module docstring)."""

    def __init__(self, host: IHost, protocol: CircuitV2Protocol) -> None:
        self._host = host
        self._swarm = host.get_network()
        self._direct = self._swarm.dial_peer
        # STOP only: dialing through a relay must not make a reservation on it
        self._transport = CircuitV2Transport(host, protocol, RelayConfig(roles=RelayRole.STOP))
        self._locks: dict[ID, trio.Lock] = {}
        self._relayed: OrderedDict[ID, tuple[tuple[Multiaddr, ...], float]] = OrderedDict()
        self.on_relayed: Callable[[ID], None] | None = None
        """Called with the peer after each relayed connection this node opens (hole punching)."""

    def install(self) -> None:
        self._swarm.dial_peer = self.dial_peer  # type: ignore[method-assign]

    def learn(self, peer: ID, addrs: Sequence[Multiaddr], ttl_s: float) -> None:
        """Keep `peer`'s relayed addresses for `ttl_s` (its advert's), apart from the peerstore:
        py-libp2p replaces a peer's addresses there with the listen addresses its identify and
        signed peer records carry, and a node behind NAT lists only private ones in those."""
        circuits = tuple(a for a in addrs if is_circuit(a))[:MAX_RELAYED_ADDRS]
        if not circuits:
            return
        self._relayed[peer] = (circuits, time.monotonic() + ttl_s)
        self._relayed.move_to_end(peer)
        while len(self._relayed) > MAX_RELAYED_PEERS:  # adverts of many identities must not grow it
            self._relayed.popitem(last=False)

    def _circuits(self, peer: ID, known: Sequence[Multiaddr]) -> list[Multiaddr]:
        circuits = [a for a in known if is_circuit(a)]
        learnt, until = self._relayed.get(peer, ((), 0.0))
        if until > time.monotonic():
            circuits += [a for a in learnt if a not in circuits]
        return circuits

    async def dial_peer(self, peer_id: ID) -> list[INetConn]:
        """Direct addresses first (a relay is slower and shared), then relayed ones; one dial per
        peer at a time, so two streams opened at once share one relayed connection."""
        try:
            addrs = self._host.get_peerstore().addrs(peer_id)
        except PeerStoreError:  # none known: the swarm's own dial says so
            addrs = []
        circuits = self._circuits(peer_id, addrs)
        direct = [a for a in addrs if not is_circuit(a)]
        log.debug("dialing %s: %d direct and %d relayed addresses", peer_id, len(direct), len(circuits))
        if not circuits:
            return await self._direct(peer_id)
        lock = self._locks.setdefault(peer_id, trio.Lock())
        try:
            async with lock:
                existing = self._swarm.get_connections(peer_id)
                if existing:
                    return list(existing)
                if direct:
                    try:
                        return await self._direct(peer_id)
                    except SwarmException as exc:
                        log.debug("no direct connection to %s (%s): trying its relays", peer_id, exc)
                conn = await self._through_relays(peer_id, circuits)
                if self.on_relayed is not None:
                    self.on_relayed(peer_id)
                return [conn]
        finally:
            if not lock.locked() and not lock.statistics().tasks_waiting:
                self._locks.pop(peer_id, None)

    async def _through_relays(self, peer_id: ID, circuits: Sequence[Multiaddr]) -> INetConn:
        errors: list[str] = []
        for addr in circuits:
            full = addr if _ends_in_p2p(addr) else addr.encapsulate(Multiaddr(f"/p2p/{peer_id.to_base58()}"))
            relay = info_from_p2p_addr(full.decapsulate_code(P_P2P).decapsulate_code(P_P2P_CIRCUIT))
            self._host.get_peerstore().add_addrs(relay.peer_id, relay.addrs, 600)
            try:
                # A timeout here may cancel I/O on the relay's connection mid-write and so break it
                # (node/README.md, "Cancellation"); only a relay that is already failing pays that.
                with trio.fail_after(RELAY_TIMEOUT_S):
                    return await self._transport.dial(full)
            except Exception as exc:  # trio.TooSlowError included
                errors.append(f"{addr}: {exc or type(exc).__name__}")
        raise SwarmException(f"cannot reach {peer_id} through its relays: {'; '.join(errors)}")


def add_relays(known: Sequence[Multiaddr], found: Sequence[Multiaddr]) -> list[Multiaddr]:
    """`known` relays, then those of `found` whose peer is not among them (full multiaddrs)."""
    ids = {info_from_p2p_addr(addr).peer_id for addr in known}
    return [*known, *(addr for addr in found if info_from_p2p_addr(addr).peer_id not in ids)]


def _ends_in_p2p(addr: Multiaddr) -> bool:
    return list(addr.protocols())[-1].code == P_P2P


class RelayReservation:
    """Holds a reservation on one of `relays` (full multiaddrs ending in /p2p/<relay id>, in order
    of preference) for as long as it runs: renews it `renew_margin_s` before it ends, makes a new
    one as soon as the connection to the relay is lost (the relay restarted), and retries a failed
    one with exponential backoff, logging why. A relay that refuses, or that it cannot reach
    FAILOVER_TRIES times in a row, is left for the next candidate (round robin), so a relay gone
    for good costs a node with a second one its relayed address for seconds, not for ever. After
    a round in which every candidate failed, `discover` (if given: the DHT's relays, directory.py)
    names the candidates to try beyond `relays`, so a node whose every relay is gone finds new ones."""

    def __init__(self, host: IHost, relays: Sequence[Multiaddr], guard: StopGuard, *,
                 discover: Callable[[], Awaitable[Sequence[Multiaddr]]] | None = None) -> None:
        if not relays:
            raise ValueError("a reservation needs at least one candidate relay")
        self._host = host
        self._fixed = list(relays)
        self._discover = discover
        self._candidates = [(addr, info_from_p2p_addr(addr)) for addr in relays]
        self._current = 0
        self._guard = guard
        self.expires_at = 0.0  # unix time; 0: none held
        self.reservations = 0  # reservations made so far (renewals included)
        self.attempts = 0  # reservations asked for so far, granted or not

    @property
    def relay(self) -> Multiaddr:
        """The relay this node reserves on now."""
        return self._candidates[self._current][0]

    @property
    def relay_id(self) -> ID:
        return self._candidates[self._current][1].peer_id

    @property
    def active(self) -> bool:
        return self.expires_at > time.time()

    def addrs(self) -> list[Multiaddr]:
        """The relayed transport address while a reservation is held, else none."""
        return [self.relay.encapsulate(Multiaddr("/p2p-circuit"))] if self.active else []

    async def reserve_once(self) -> float:
        """Connect to the current relay if need be and reserve a slot; the reservation's expiry (unix
        time). Raises ReservationRefused, or the dial's or stream's error."""
        self.attempts += 1
        forget_failed_dial(self._host, self.relay_id)  # `run`'s backoff paces these dials
        with trio.fail_after(RELAY_TIMEOUT_S):
            await self._host.connect(self._candidates[self._current][1])
            stream = await self._host.new_stream(self.relay_id, [HOP_PROTOCOL_ID])
            try:
                await write_delimited_msg(stream, HopMessage(type=HopMessage.RESERVE,
                                                             peer=PeerId(id=self._host.get_id().to_bytes())))
                reply = await read_delimited_msg(stream, HopMessage)  # capped at 64 KiB by py-libp2p
            finally:
                await stream.close()
        status = reply.status if reply.HasField("status") else StatusCode.OK
        if status != StatusCode.OK:
            raise ReservationRefused(self.relay, status)
        if not reply.HasField("reservation") or reply.reservation.expire <= time.time():
            raise ReservationRefused(self.relay, StatusCode.MALFORMED_MESSAGE)
        self._guard.relay = self.relay_id
        self.expires_at = float(reply.reservation.expire)
        self.reservations += 1
        return self.expires_at

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Reserve, then keep a reservation; `started` after the first attempt, whatever its outcome,
        so that a node whose relays are down still starts (reachable directly only, until it succeeds)."""
        backoff = RETRY_MIN_S
        failures = 0  # in a row, on the current relay
        moves = 0  # to the next candidate since the last reservation
        started = False
        while True:
            try:
                expires = await self.reserve_once()
            except Exception as exc:  # trio.TooSlowError included
                self.expires_at = 0.0
                failures += 1
                refused = isinstance(exc, ReservationRefused)
                failed = exc if refused else f"no reservation on relay {self.relay}: {exc or type(exc).__name__}"
                if not started:
                    started = True
                    task_status.started()
                round_failed = False
                if refused or failures >= FAILOVER_TRIES:
                    self._current = (self._current + 1) % len(self._candidates)
                    failures = 0
                    moves += 1
                    if moves % len(self._candidates):  # a candidate not yet tried this round: at once
                        log.warning("%s; trying relay %s instead", failed, self.relay)
                        continue
                    round_failed = True
                log.log(logging.ERROR if refused else logging.WARNING,
                        "%s; retrying in %.0f s (reachable only directly until then)", failed, backoff)
                await trio.sleep(backoff)
                backoff = min(2 * backoff, RETRY_MAX_S)
                if round_failed and self._discover is not None:
                    await self._rediscover()
                    moves = 0
                continue
            backoff = RETRY_MIN_S
            failures = moves = 0
            log.info("reserved a slot on relay %s for %.0f s: reachable at %s", self.relay, expires - time.time(),
                     self.relay.encapsulate(Multiaddr(f"/p2p-circuit/p2p/{self._host.get_id().to_base58()}")))
            if not started:
                started = True
                task_status.started()
            await self._hold(expires)

    async def _rediscover(self) -> None:
        """Candidates anew after a failed round: the fixed ones, then those `discover` names now
        (the DHT's records change: relays come and go), starting again from the first."""
        assert self._discover is not None
        before = {info.peer_id for _, info in self._candidates}
        self._candidates = [(addr, info_from_p2p_addr(addr)) for addr in add_relays(self._fixed, await self._discover())]
        self._current = 0
        if new := [addr for addr, info in self._candidates if info.peer_id not in before]:
            log.info("%d more candidate relay(s) from the DHT: %s", len(new), ", ".join(map(str, new)))

    async def _hold(self, expires: float) -> None:
        """Return when the reservation must be made again: near its end, or once the relay is lost."""
        margin = min(60.0, (expires - time.time()) / 4)
        renew_at = trio.current_time() + max(0.0, expires - time.time() - margin)
        network = self._host.get_network()
        while trio.current_time() < renew_at:
            await trio.sleep(min(WATCH_S, max(0.0, renew_at - trio.current_time())))
            if not network.get_connections(self.relay_id):
                log.warning("lost the connection to relay %s: reserving again", self.relay)
                self.expires_at = 0.0
                return
        log.debug("renewing the reservation on relay %s", self.relay)

