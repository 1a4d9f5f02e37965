"""Relays found through the DHT, beyond a node's bootstrap peers.

A node started with `--relay-service` provides RELAY_KEY in the DHT (`announce`), again every
ANNOUNCE_S so that nodes joining later hold its record too. A node behind NAT (`--relay auto`)
looks the key up for candidates after its bootstrap peers, and again after every round in which
all its candidates failed, so that a relay gone for good is replaced by one that came up since.

Anyone may store a provider record under any key, with any addresses in it: a lookup takes at most
MAX_DHT_RELAYS relays, one address each, and only an address a node may dial for a stranger (TCP,
another machine, not itself relayed: punch.dialable). A record that lies costs the node failed
dials within the reservation's backoff, and a relay it reserves on carries only end-to-end
encrypted connections: a hostile relay can drop them, which failover then handles, but not read them.
"""

from __future__ import annotations

import logging

from libp2p.kad_dht.kad_dht import KadDHT
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from ..dhtkeys import provide_forever, provider_key
from .punch import dialable

log = logging.getLogger(__name__)

RELAY_KEY = provider_key(b"/cipherswarm/relay/1")
ANNOUNCE_S = 600.0
MAX_DHT_RELAYS = 8


async def announce(dht: KadDHT, *, interval_s: float = ANNOUNCE_S) -> None:
    """Provide RELAY_KEY now and every `interval_s`, for as long as this runs (a relay's nursery)."""
    await provide_forever(dht, [RELAY_KEY], interval_s=interval_s, what="relay")


async def relays_in_dht(dht: KadDHT, me: ID, *, limit: int = MAX_DHT_RELAYS) -> list[Multiaddr]:
    """Full multiaddrs (`.../p2p/<relay>`) of up to `limit` relays the DHT names, other than `me`
    (module docstring); none if the lookup fails."""
    try:
        infos = await dht.find_providers(RELAY_KEY, count=2 * limit)
    except Exception as exc:  # no DHT peers yet, or all gone: the next round asks again
        log.warning("relay lookup in the DHT failed: %s", exc)
        return []
    found: dict[ID, Multiaddr] = {}
    for info in infos:
        if info.peer_id == me or info.peer_id in found:
            continue
        addr = next((a for a in info.addrs if dialable(a)), None)
        if addr is None:
            continue
        ip = list(addr.protocols())[0].name  # ip4 or ip6 (dialable), then tcp; anything after it dropped
        found[info.peer_id] = Multiaddr(f"/{ip}/{addr.value_for_protocol(ip)}/tcp/{addr.value_for_protocol('tcp')}"
                                        f"/p2p/{info.peer_id.to_base58()}")
        if len(found) == limit:
            break
    return list(found.values())
