"""One libp2p host with everything a cipherswarm node runs on it: gossipsub and the Kademlia DHT.

Transport choices follow /work/shared/design/libp2p-notes.md: Noise only and yamux only, passed
explicitly (a default host would also offer TLS, secio, plaintext and mplex); the Noise transport is
built with the host's own identity key pair, so a peer's Noise identity is its peer id;
`max_connections_per_peer=1` removes the ~250 ms happy-eyeballs wait of every dial; gossipsub's
heartbeat is 1 s instead of 120 s, so a new peer joins the advert mesh within a second.

The DHT does not add connected peers to its routing table by itself, so a notifee queues every new
connection and a task adds the peer (servers only: a peer that does not speak the DHT protocol is
refused by the routing table's own check).

Pubsub's inbound streams are served through `_PubsubStreams`, which ends them all before pubsub
stops (its docstring says why).

Every host also runs circuit relay v2 and AutoNAT (node/nat/README.md): it dials relayed addresses,
answers dial-back requests, relays for others with `relay_service` (and says so in the DHT), and
with `relay` holds a reservation on a relay and names itself by its relayed address. A bootstrap peer it loses (a relay
that restarted) it dials again every REJOIN_S (`NodeHost.rejoin`).

Bulk transfer. Payloads are tens of MB, and py-libp2p's stack costs its Python per message, not per
byte: each 64 KiB yamux frame went out as two Noise messages (65,536 bytes do not fit in one
65,519-byte Noise plaintext) and two socket sends, each Noise message was read with two `recv`
calls, and every read of a stream sent a window update of its own. Measured on loopback, that cost the client
8.5 ns of CPU per byte sent and 10.3 per byte received, against 0.3 for ChaCha20-Poly1305 itself. So,
wire-compatible with any libp2p peer:
- `_NoiseSession` replaces the Noise session after the handshake: reads take whatever the socket
  holds (up to `READ_AHEAD`) and decrypt every whole Noise message in it; a write encrypts all its
  Noise messages and hands them to the socket in one send;
- yamux DATA frames carry up to `YAMUX_FRAME - 12` bytes (16 full Noise messages; the yamux spec
  bounds a frame by the receive window only, which go-yamux and py-libp2p both check), and
  streams.py writes a frame's worth at a time, so the reader's auto-tuning sees few, large reads.
py-libp2p builds its yamux connections itself (muxer_opt names the protocol, not the class), so
the receive window is left to its auto-tuning.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal

import trio
from libp2p import new_host
from libp2p.abc import IHost, INetConn, INetStream, INetwork, INotifee, IRawConnection, ISecureConn
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.pubsub.gossipsub import PROTOCOL_ID as GOSSIPSUB_V10
from libp2p.pubsub.gossipsub import PROTOCOL_ID_V11 as GOSSIPSUB_V11
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.io.exceptions import ConnectionClosedError
from libp2p.security.noise.io import MAX_PLAINTEXT_LENGTH, NoiseTransportReadWriter
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.tools.anyio_service import background_trio_service
from multiaddr import Multiaddr

from .cpu import TrioMeter
from .logs import route_libp2p_logs
from .nat import (
    CircuitDialer,
    HolePuncher,
    RelayReservation,
    RelayServiceConfig,
    StopGuard,
    circuit_protocol,
    forget_failed_dial,
    is_circuit,
)
from .nat.autonat import auto_relay
from .nat.directory import announce as announce_relay
from .nat.autonat import serve as serve_autonat
from .streams import YAMUX_FRAME, close_stream

log = logging.getLogger(__name__)

LOOPBACK = Multiaddr("/ip4/127.0.0.1/tcp/0")
"""Default listen address: loopback, on a free port."""
DIAL_TIMEOUT_S = 10.0
REJOIN_S = 5.0
"""How often a node dials again the bootstrap peers it lost (`NodeHost.rejoin`)."""
GOSSIP_HEARTBEAT_S = 1
READ_AHEAD = 1 << 20
"""Most bytes one socket read of a Noise session takes (module docstring, "Bulk transfer")."""
# py-libp2p reads the frame size from this module constant at every write.
yamux_module.MAX_MESSAGE_SIZE = YAMUX_FRAME


@dataclass(eq=False)
class NodeHost:
    """A running host and the services on it; `open_host` makes one."""

    host: IHost
    pubsub: Pubsub
    dht: KadDHT
    key_pair: KeyPair
    cpu: TrioMeter  # the trio thread's CPU by part; its Noise sessions book "noise" to it
    dialer: CircuitDialer | None = None  # reaches peers through their relays
    reservation: RelayReservation | None = None  # the relay slot this node holds (`--relay ADDR ...`)
    puncher: HolePuncher | None = None  # upgrades relayed connections to direct ones (node/nat/punch.py)

    @property
    def peer_id(self) -> ID:
        return self.host.get_id()

    @property
    def relayed(self) -> bool:
        """Whether others reach this node through its relay now."""
        return self.reservation is not None and self.reservation.active

    def direct_to(self, peer: ID) -> bool:
        """Whether a connection to `peer` stands that does not go through a relay."""
        return any(not any(is_circuit(a) for a in conn.get_transport_addresses())
                   for conn in self.host.get_network().get_connections(peer))

    def addrs(self) -> list[Multiaddr]:
        """Full multiaddrs others can dial, each ending in /p2p/<peer id>."""
        me = Multiaddr(f"/p2p/{self.peer_id.to_base58()}")
        return [addr.encapsulate(me) for addr in self.transport_addrs()]

    def transport_addrs(self) -> list[Multiaddr]:
        """The same without the /p2p/ part, as adverts carry them: the relayed address alone while
        a reservation is held (the listen addresses of a node behind NAT are private: a dial to
        them fails, or hangs for a dial timeout), the listen addresses otherwise."""
        if self.reservation is not None and self.reservation.active:
            return self.reservation.addrs()
        return [addr.decapsulate_code(0x01A5) for addr in self.host.get_addrs()]  # 0x01a5: the p2p protocol

    def remember(self, peer: ID, addrs: Sequence[Multiaddr], ttl_s: int = 600) -> None:
        """Put a peer's addresses in the peerstore, so that `new_stream` can dial it."""
        if addrs and peer != self.peer_id:
            self.host.get_peerstore().add_addrs(peer, list(addrs), ttl_s)
            if self.dialer is not None:
                self.dialer.learn(peer, addrs, ttl_s)

    def connected(self, peer: ID) -> bool:
        return bool(self.host.get_network().get_connections(peer))

    async def disconnect(self, peer: ID) -> None:
        """Drop every connection to `peer` (shielded, bounded), so the next stream dials afresh.
        py-libp2p keeps a broken connection registered, and every later stream to the peer
        fails on it, until it is closed."""
        with trio.CancelScope(shield=True), trio.move_on_after(DIAL_TIMEOUT_S):
            try:
                await self.host.get_network().close_peer(peer)
            except Exception as exc:  # closing a broken connection may raise; it is closed either way
                log.debug("closing the connections to %s: %s", peer, exc)

    async def connect(self, addr: Multiaddr) -> ID:
        """Dial a full multiaddr; raises trio.TooSlowError after DIAL_TIMEOUT_S or the dial's error."""
        info = info_from_p2p_addr(addr)
        with trio.fail_after(DIAL_TIMEOUT_S):
            await self.host.connect(info)
        return info.peer_id

    async def connect_all(self, addrs: Sequence[Multiaddr]) -> list[ID]:
        """Dial each address, logging (not raising) the ones that fail; the peers reached."""
        reached: list[ID] = []
        for addr in addrs:
            try:
                reached.append(await self.connect(addr))
            except Exception as exc:  # a dead bootstrap peer must not stop the node
                log.warning("cannot reach %s: %s", addr, exc or type(exc).__name__)
        return reached

    async def rejoin(self, bootstrap: Sequence[Multiaddr]) -> None:
        """Every REJOIN_S, dial again each bootstrap peer this node has no connection to. They are
        how it hears adverts and reaches the DHT (and the relay of a node behind NAT is one), so
        one that restarted must be joined again, not lost for the rest of the node's life."""
        network = self.host.get_network()
        while True:
            await trio.sleep(REJOIN_S)
            for addr in bootstrap:
                try:
                    peer = info_from_p2p_addr(addr).peer_id
                    if network.get_connections(peer):
                        continue
                    forget_failed_dial(self.host, peer)  # this loop paces its own dials
                    await self.connect(addr)
                    log.info("joined bootstrap peer %s again", addr)
                except Exception as exc:  # still gone: the next round tries again
                    log.debug("bootstrap peer %s still out of reach: %s", addr, exc or type(exc).__name__)


class _ConnectionQueue(INotifee):
    """Queues the peer of every new connection; drops it if the queue is full (the next
    connection or lookup fills the table anyway)."""

    def __init__(self, send: trio.MemorySendChannel[ID]) -> None:
        self._send = send

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        try:
            self._send.send_nowait(conn.muxed_conn.peer_id)
        except (trio.WouldBlock, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        await trio.lowlevel.checkpoint()

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        await trio.lowlevel.checkpoint()

    async def listen(self, network: INetwork, multiaddr: Multiaddr) -> None:
        await trio.lowlevel.checkpoint()

    async def listen_close(self, network: INetwork, multiaddr: Multiaddr) -> None:
        await trio.lowlevel.checkpoint()


class _PubsubStreams:
    """Serves inbound pubsub streams with pubsub's own handler, each under a cancel scope of ours,
    so that the host's teardown can end every one of them before pubsub stops.

    Pubsub's handler runs in the swarm's connection tasks, not in pubsub's nursery, and hands every
    message and subscription it reads to a new pubsub task. Its guard (`manager.is_running`) still
    holds for a moment after pubsub's task nursery has closed, so a message read in that moment
    raises trio's "Nursery is closed to new arrivals" in the swarm, and the host's teardown fails
    with it. Hanging up on every peer before pubsub stops does not close that window: a peer hung
    up on early dials back in while the others are still being hung up on, and gossips at once.

    Cancelling a handler may cancel a read mid-way and so break its connection (streams.py); that
    is harmless here, as the host hangs up on every connection right after.
    """

    def __init__(self, pubsub: Pubsub) -> None:
        self._pubsub = pubsub
        self._running: set[trio.CancelScope] = set()
        self._closed = False
        self._all_returned = trio.Event()

    async def handle(self, stream: INetStream) -> None:
        """Stream handler of the pubsub protocols: pubsub's own until `close`, a reset after it."""
        if self._closed:
            await close_stream(stream, reset=True)
            return
        with trio.CancelScope() as scope:
            self._running.add(scope)
            try:
                await self._pubsub.stream_handler(stream)
            finally:
                self._running.discard(scope)
                if self._closed and not self._running:
                    self._all_returned.set()

    async def close(self) -> None:
        """Refuse new pubsub streams, end the handlers running, and wait until all have returned."""
        self._closed = True
        for scope in self._running:
            scope.cancel()
        if self._running:
            await self._all_returned.wait()


async def _add_to_routing_table(dht: KadDHT, peer: ID) -> None:
    try:
        await dht.add_peer(peer)  # no timeout of ours: it would cancel stream I/O (streams.py)
    except Exception as exc:  # a peer that left meanwhile, or speaks no DHT
        log.debug("not adding %s to the routing table: %s", peer, exc)


async def _fill_routing_table(dht: KadDHT, peers: trio.MemoryReceiveChannel[ID]) -> None:
    async with peers:
        async for peer in peers:
            await _add_to_routing_table(dht, peer)


class _NoiseSession(SecureSession):
    """A Noise transport session that reads ahead and writes in one piece ("Bulk transfer" above).

    Same wire format as libp2p's: 2-byte big-endian length, then ChaCha20-Poly1305 ciphertext of at
    most MAX_PLAINTEXT_LENGTH bytes. Cancelling a read loses nothing: bytes are taken off the socket
    and decrypted without a checkpoint in between, and plaintext stays buffered until a read takes it.
    """

    def __init__(self, session: SecureSession, meter: TrioMeter) -> None:
        rw = session.conn
        if not isinstance(rw, NoiseTransportReadWriter):
            raise TypeError(f"not a Noise transport session: {type(rw).__name__}")
        super().__init__(local_peer=session.local_peer, local_private_key=session.local_private_key,
                         remote_peer=session.remote_peer, remote_permanent_pubkey=session.remote_permanent_pubkey,
                         is_initiator=session.is_initiator, conn=rw)
        self._raw: IRawConnection = rw.read_writer.read_write_closer  # type: ignore[assignment]
        self._noise = rw.noise_state
        self._meter = meter
        self._cipher = bytearray()  # bytes read off the socket, not yet a whole Noise message
        self._plain = bytearray()  # decrypted, not yet read

    def _decrypt_whole(self) -> None:
        """Move every whole Noise message of the read-ahead buffer into the plaintext buffer."""
        buf, done = self._cipher, 0
        with self._meter.section("noise"), memoryview(buf) as view:  # released before the buffer shrinks
            while len(buf) - done >= 2:
                size = (buf[done] << 8) | buf[done + 1]
                if len(buf) - done - 2 < size:
                    break
                self._plain += self._noise.decrypt(bytes(view[done + 2 : done + 2 + size]))
                done += 2 + size
        del buf[:done]

    async def read(self, n: int | None = None) -> bytes:
        """`n` bytes (fewer only when the connection ends), or with `n` None whatever is decrypted."""
        if n == 0:
            return b""
        while not self._plain if n is None else len(self._plain) < n:
            data = await self._raw.read(READ_AHEAD)
            if not data:
                if self._plain:
                    break
                raise ConnectionClosedError("Connection closed")
            self._cipher += data
            self._decrypt_whole()
        take = len(self._plain) if n is None else min(n, len(self._plain))
        with memoryview(self._plain) as view:
            out = bytes(view[:take])
        del self._plain[:take]
        return out

    async def write(self, data: bytes) -> None:
        out = bytearray()
        with self._meter.section("noise"):
            for start in range(0, max(len(data), 1), MAX_PLAINTEXT_LENGTH):
                sealed = self._noise.encrypt(bytes(data[start : start + MAX_PLAINTEXT_LENGTH]))
                out += len(sealed).to_bytes(2, "big")
                out += sealed
        await self._raw.write(out)  # type: ignore[arg-type]  # any bytes-like goes to the socket


class _Noise(NoiseTransport):
    """libp2p's Noise XX handshake, then a `_NoiseSession` for the connection."""

    def __init__(self, key_pair: KeyPair, meter: TrioMeter) -> None:
        super().__init__(key_pair, noise_privkey=new_x25519_key_pair().private_key)
        self._meter = meter

    def _session(self, conn: ISecureConn) -> ISecureConn:
        return _NoiseSession(conn, self._meter) if isinstance(conn, SecureSession) else conn

    async def secure_inbound(self, conn: IRawConnection) -> ISecureConn:
        return self._session(await super().secure_inbound(conn))

    async def secure_outbound(self, conn: IRawConnection, peer_id: ID) -> ISecureConn:
        return self._session(await super().secure_outbound(conn, peer_id))


def _new_host(key_pair: KeyPair, listen: Sequence[Multiaddr], meter: TrioMeter) -> IHost:
    return new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: _Noise(key_pair, meter)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        listen_addrs=list(listen),
    )


@asynccontextmanager
async def open_host(
    key_pair: KeyPair,
    *,
    listen: Sequence[Multiaddr] = (LOOPBACK,),
    dht_mode: DHTMode = DHTMode.SERVER,
    bootstrap: Sequence[Multiaddr] = (),
    relay_service: RelayServiceConfig | None = None,
    relay: Sequence[Multiaddr] | Literal["auto"] | None = None,
) -> AsyncIterator[NodeHost]:
    """Start a host listening on `listen` with gossipsub and the DHT, dial `bootstrap`, and stop
    everything on exit. Providers run the DHT as servers, clients as clients.

    Every host can dial peers known only by relayed addresses (node/nat). With `relay_service` it
    relays for others within those limits; with `relay` (relays' full multiaddrs, in order of
    preference) it holds a reservation on one of them, failing over to the next, and names itself
    by its relayed address (`NodeHost.addrs`); the first reservation is tried before this returns.
    `relay="auto"` asks the bootstrap peers whether this node is reachable (AutoNAT) and, if not,
    reserves on the first of them that relays, with the others and the relays the DHT names to fail
    over to (nat/directory.py). Every host answers others' AutoNAT requests; one with
    `relay_service` provides its relay record in the DHT."""
    if not logging.getLogger("libp2p").handlers:
        route_libp2p_logs()
    cpu = TrioMeter()
    host = _new_host(key_pair, listen, cpu)
    gossip = GossipSub(
        protocols=[GOSSIPSUB_V11, GOSSIPSUB_V10],
        degree=6,
        degree_low=4,
        degree_high=12,
        heartbeat_interval=GOSSIP_HEARTBEAT_S,
    )
    pubsub = Pubsub(host, gossip)
    pubsub_streams = _PubsubStreams(pubsub)
    for protocol in pubsub.protocols:  # replaces the handlers Pubsub registered for itself
        host.set_stream_handler(protocol, pubsub_streams.handle)
    dht = KadDHT(host, dht_mode)
    dht.strict_validation = True  # values only in namespaces with a validator: nobody parks arbitrary records on us
    send, receive = trio.open_memory_channel[ID](64)
    host.get_network().register_notifee(_ConnectionQueue(send))
    circuits = circuit_protocol(host, relay_service)
    dialer = CircuitDialer(host, circuits)
    dialer.install()
    puncher = HolePuncher(host)
    dialer.on_relayed = puncher.upgrade_soon
    guard = StopGuard(circuits)
    autonat = serve_autonat(host)
    async with host.run(list(listen)):
        async with background_trio_service(pubsub), background_trio_service(gossip), background_trio_service(dht), \
                background_trio_service(circuits), background_trio_service(puncher):
            await pubsub.wait_until_ready()
            guard.install(host)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_fill_routing_table, dht, receive)
                node = NodeHost(host, pubsub, dht, key_pair, cpu, dialer, puncher=puncher)
                for peer in await node.connect_all(bootstrap):
                    # Now rather than through the queue, so that a provider's first DHT record already
                    # reaches its bootstrap peers.
                    await _add_to_routing_table(dht, peer)
                if bootstrap:  # nothing to rejoin otherwise: no wake-ups every REJOIN_S
                    nursery.start_soon(node.rejoin, bootstrap)
                if relay == "auto":
                    node.reservation = await auto_relay(autonat, host, dht, bootstrap, guard)
                elif relay:
                    node.reservation = RelayReservation(host, relay, guard)
                if node.reservation is not None:
                    await nursery.start(node.reservation.run)
                if relay_service is not None:
                    nursery.start_soon(announce_relay, dht)
                yield node
                nursery.cancel_scope.cancel()
            # No gossip may reach pubsub once it starts stopping (_PubsubStreams).
            await pubsub_streams.close()
            # Hang up while the services still run, so that pubsub still handles each departure and
            # peers stop reopening the pubsub streams that are now refused.
            for peer in list(host.get_network().connections):
                await node.disconnect(peer)
            # py-libp2p 0.8.1 leaves the TCP listening socket open after its host stops; with
            # SO_REUSEPORT a node restarted on the same port would then lose some incoming dials to it.
            with trio.CancelScope(shield=True), trio.move_on_after(DIAL_TIMEOUT_S):
                for listener in list(host.get_network().listeners.values()):
                    await listener.close()
