"""`--relay auto`: ask the bootstrap peers whether this node is reachable (AutoNAT v1, py-libp2p's
`AutoNATService`), and if it is not, reserve a slot on the first of them that relays, or on a relay
found in the DHT (directory.py).

Every node answers dial-back requests (`serve`). py-libp2p 0.8.1's server dials back only addresses
on the IP it observes the asker at, and it dials with `host.connect`, which returns the connection
the request came on when one exists: so in practice its verdict says whether the asker *listens on
the IP it is seen at*. Behind a NAT router a node listens on a private address and is seen at the
router's, so every server refuses (E_DIAL_REFUSED): private. A node with a public address is
answered OK: public, even when a firewall would drop new connections to it (README.md).

py-libp2p's own aggregation (`check_reachability`) needs four agreeing servers and counts a server
that does not speak AutoNAT as a failed dial-back; here only real verdicts count, and any OK wins.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Awaitable, Callable, Sequence

import trio
from libp2p.abc import IHost, INetStream
from libp2p.host.autonat.autonat import AUTONAT_PROTOCOL_ID, AutoNATService
from libp2p.host.autonat.pb.autonat_pb2 import Message
from libp2p.host.basic_host import BasicHost
from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.peerinfo import info_from_p2p_addr
from multiaddr import Multiaddr

from .directory import relays_in_dht
from .relay import RELAY_TIMEOUT_S, RelayReservation, StopGuard, add_relays

log = logging.getLogger(__name__)

CHOOSE_TIMEOUT_S = 2 * RELAY_TIMEOUT_S
"""Longest a starting node tries candidate relays one after another before it starts anyway."""


class Reachability(enum.Enum):
    PUBLIC = "public"
    PRIVATE = "private"
    UNKNOWN = "unknown"  # nobody gave a verdict


def serve(host: IHost) -> AutoNATService:
    """Answer other nodes' dial-back requests, each within RELAY_TIMEOUT_S (py-libp2p's handler
    waits for the request without a deadline)."""
    if not isinstance(host, BasicHost):
        raise TypeError(f"AutoNAT needs a BasicHost, not {type(host).__name__}")
    service = AutoNATService(host, serve=False)

    async def handle(stream: INetStream) -> None:
        with trio.move_on_after(RELAY_TIMEOUT_S) as scope:
            await service.handle_stream(stream)  # closes the stream itself
        if scope.cancelled_caught:
            await stream.reset()

    host.set_stream_handler(AUTONAT_PROTOCOL_ID, handle)
    return service


async def reachability(service: AutoNATService, peers: Sequence[Multiaddr]) -> Reachability:
    """Public if any peer dialed back, private if every peer that answered could not, unknown if
    none answered."""
    verdicts: list[bool] = []
    for addr in peers:
        peer = info_from_p2p_addr(addr).peer_id
        try:
            status, _ = await service.query_server(peer, timeout=RELAY_TIMEOUT_S)
        except Exception as exc:  # not an AutoNAT server, gone, or too slow (TooSlowError): no verdict
            log.debug("no AutoNAT verdict from %s: %s", peer, exc)
            continue
        verdicts.append(status == Message.OK)
        log.debug("AutoNAT verdict from %s: %s", peer, Message.ResponseStatus.Name(status))
    if any(verdicts):
        return Reachability.PUBLIC
    return Reachability.PRIVATE if verdicts else Reachability.UNKNOWN


async def choose_relay(host: IHost, candidates: Sequence[Multiaddr], guard: StopGuard, *,
                       discover: Callable[[], Awaitable[Sequence[Multiaddr]]] | None = None) -> RelayReservation | None:
    """A reservation held on the first candidate that grants one (peers that do not relay refuse
    the hop protocol), with the others after it to fail over to. If none grants one within
    CHOOSE_TIMEOUT_S (a DHT record may name addresses that drop every packet, each costing a dial's
    timeout, and the node does not start before this returns): None, or with `discover` a
    reservation that goes on trying them and the relays it discovers (RelayReservation.run)."""
    with trio.move_on_after(CHOOSE_TIMEOUT_S):
        for i in range(len(candidates)):
            reservation = RelayReservation(host, [*candidates[i:], *candidates[:i]], guard, discover=discover)
            try:
                await reservation.reserve_once()
            except Exception as exc:  # trio.TooSlowError included
                log.info("peer %s does not relay for this node: %s", candidates[i], exc or type(exc).__name__)
                continue
            return reservation
    return RelayReservation(host, candidates, guard, discover=discover) if discover and candidates else None


async def auto_relay(service: AutoNATService, host: IHost, dht: KadDHT, bootstrap: Sequence[Multiaddr],
                     guard: StopGuard) -> RelayReservation | None:
    """`--relay auto`: if the bootstrap peers find this node unreachable, a reservation on one of
    them or on a relay the DHT names (directory.py), looked up again whenever all have failed;
    else None (reachable, or nobody to ask)."""
    verdict = await reachability(service, bootstrap)
    log.info("reachability according to %d bootstrap peer(s): %s", len(bootstrap), verdict.value)
    if verdict is not Reachability.PRIVATE:
        return None

    async def discover() -> list[Multiaddr]:
        return await relays_in_dht(dht, host.get_id())

    reservation = await choose_relay(host, add_relays(bootstrap, await discover()), guard, discover=discover)
    if reservation is None or not reservation.active:
        log.warning("unreachable behind NAT, and no bootstrap peer or relay in the DHT grants a reservation yet "
                    "(retrying; start one with --relay-service, or pass --relay MULTIADDR)")
    return reservation
