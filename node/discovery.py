"""How clients find providers: signed adverts on gossipsub, DHT provider records, direct fetches.

A provider announces itself with its sealed `CapabilityAdvert` (the protocol's `Envelope` bytes,
signed by the provider):

- gossip: published on ADVERT_TOPIC at start, every `interval_s`, and soon after any change (free
  slots); paced at least `min_gap_s` apart, because gossipsub silently drops more than 10 messages
  a second per peer and topic. Adverts expire, so a lost one is only late, never wrong.
- DHT provider record: under `model_key(model_hash)` for each model it holds, refreshed every
  `interval_s` in a task of its own, so that a slow DHT never delays a gossip advert.
- on request: on ADVERT_PROTOCOL_ID it writes its current advert and closes the stream (protocol
  README, "Adverts").

A client subscribes to the topic, and at start and every `lookup_interval_s` looks the model up
in the DHT and fetches the advert of every provider found and every peer it is connected to
directly from that peer. It therefore knows a provider within one round trip of finding it,
without waiting for its next gossip and without the DHT's value lookups, which wait out their
10 s query timeout on every departed peer.

`model_key` derives its key from `/cipherswarm/model/1/ || model_hash` (dhtkeys.py).

DHT calls carry no timeout of ours: py-libp2p bounds each query itself, and an outer timeout
would cancel stream I/O mid-write, which breaks the connection (streams.py).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING

import trio
from libp2p.abc import INetStream, ISubscriptionAPI
from libp2p.peer.id import ID

from cipherswarm.protocol import ADVERT_PROTOCOL_ID, MAX_HEADER_SIZE, CapabilityAdvert, ProtocolError, seal, verify_advert

from .dhtkeys import provide_forever, provider_key
from .identity import signing_key
from .streams import close_stream, read_to_end, send_bytes
from .types import ProviderAdvert

if TYPE_CHECKING:
    from .host import NodeHost

log = logging.getLogger(__name__)

ADVERT_TOPIC = "/cipherswarm/adverts/1"
_MODEL_KEY_DOMAIN = b"/cipherswarm/model/1/"
FETCH_TIMEOUT_S = 10.0


def now_ms() -> int:
    return int(time.time() * 1000)


def model_key(model_hash: bytes) -> str:
    """DHT provider key of a model (module docstring)."""
    return provider_key(_MODEL_KEY_DOMAIN, model_hash)


def read_advert(data: bytes, *, at_ms: int | None = None) -> ProviderAdvert:
    """A provider's advert from gossip or a direct fetch; ProtocolError or ValueError if it is not
    a valid, unexpired, signed advert."""
    return ProviderAdvert.from_verified(verify_advert(data, now_ms=now_ms() if at_ms is None else at_ms))


class Advertiser:
    """Provider side: keeps the provider's advert current on gossip and in the DHT, and hands it
    out on request."""

    def __init__(
        self,
        node: NodeHost,
        advert: Callable[[], CapabilityAdvert],
        *,
        model_hashes: Sequence[bytes],
        interval_s: float,
        min_gap_s: float = 1.0,
    ) -> None:
        self._node = node
        self._advert = advert
        self._model_hashes = tuple(model_hashes)
        self.interval_s = interval_s
        self.min_gap_s = min_gap_s
        self._changed = trio.Event()

    def changed(self) -> None:
        """Something in the advert changed: publish again soon (paced by `min_gap_s`)."""
        self._changed.set()

    def envelope(self) -> bytes:
        """The current advert, sealed: the bytes gossiped and handed out."""
        return seal(self._advert(), signing_key(self._node.key_pair)).header

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        self._node.host.set_stream_handler(ADVERT_PROTOCOL_ID, self._hand_out)
        subscription = await self._node.pubsub.subscribe(ADVERT_TOPIC)  # being in the mesh relays others' adverts
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, subscription)
            await self._publish()
            nursery.start_soon(partial(provide_forever, self._node.dht, [model_key(h) for h in self._model_hashes],
                                       interval_s=self.interval_s, what="provider"))
            task_status.started()
            while True:
                with trio.move_on_after(self.interval_s):
                    await self._changed.wait()
                self._changed = trio.Event()
                await self._publish()
                await trio.sleep(self.min_gap_s)

    async def _publish(self) -> None:
        try:
            await self._node.pubsub.publish(ADVERT_TOPIC, self.envelope())
        except Exception as exc:  # a gossip hiccup only delays the advert to the next round
            log.warning("advert not published: %s", exc)

    async def _hand_out(self, stream: INetStream) -> None:
        """ADVERT_PROTOCOL_ID handler; like every stream handler, it closes its stream and never raises."""
        try:
            await send_bytes(stream, self.envelope(), timeout_s=FETCH_TIMEOUT_S)
        except Exception as exc:  # the asker went away
            log.debug("advert not handed out: %s", exc)
        finally:
            await close_stream(stream)


async def _drain(subscription: ISubscriptionAPI) -> None:
    while True:
        await subscription.get()


class AdvertWatcher:
    """Client side: feeds every valid advert for `model_hash` (any model if None) to `on_advert`."""

    def __init__(
        self,
        node: NodeHost,
        model_hash: bytes | None,
        on_advert: Callable[[ProviderAdvert], None],
        *,
        lookup_interval_s: float = 15.0,
    ) -> None:
        self._node = node
        self._model_hash = model_hash
        self._on_advert = on_advert
        self.lookup_interval_s = lookup_interval_s
        self._wanted = trio.Event()

    def request_lookup(self) -> None:
        """Look the model up again now rather than at the next interval (e.g. no provider left)."""
        self._wanted.set()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        subscription = await self._node.pubsub.subscribe(ADVERT_TOPIC)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._listen, subscription)
            task_status.started()
            while True:
                await self.lookup()  # fetches from departed peers may take a dial timeout: callers watch the table
                with trio.move_on_after(self.lookup_interval_s):
                    await self._wanted.wait()
                self._wanted = trio.Event()

    async def _listen(self, subscription: ISubscriptionAPI) -> None:
        while True:
            message = await subscription.get()
            try:
                advert = read_advert(message.data)
            except (ProtocolError, ValueError) as exc:
                log.debug("ignoring an invalid advert: %s", exc)
                continue
            self._accept(advert)

    def _accept(self, advert: ProviderAdvert) -> None:
        if self._model_hash is None or self._model_hash in advert.models:
            self._node.remember(advert.peer, advert.addrs)
            self._on_advert(advert)

    async def lookup(self) -> None:
        """Fetch the advert of every connected peer and of every provider of the model the DHT
        knows (find_providers repeats peers: deduplicated)."""
        peers = set(self._node.host.get_network().connections)
        if self._model_hash is not None:
            try:
                for info in await self._node.dht.find_providers(model_key(self._model_hash)):
                    self._node.remember(info.peer_id, info.addrs)
                    peers.add(info.peer_id)
            except Exception as exc:  # the next lookup retries
                log.warning("provider lookup failed: %s", exc)
        peers.discard(self._node.peer_id)
        async with trio.open_nursery() as nursery:
            for peer in peers:
                nursery.start_soon(self._fetch_advert, peer)

    async def _fetch_advert(self, peer: ID) -> None:
        """Ask `peer` for its advert (ADVERT_PROTOCOL_ID); peers that are not providers say no."""
        stream = None
        try:
            stream = await self._node.host.new_stream(peer, [ADVERT_PROTOCOL_ID])
            advert = read_advert(await read_to_end(stream, limit=MAX_HEADER_SIZE, timeout_s=FETCH_TIMEOUT_S))
        except Exception as exc:  # departed, not a provider, or a bad advert: nothing to learn here
            log.debug("no advert from %s: %s", peer, exc)
            return
        finally:
            if stream is not None:
                await close_stream(stream)
        if advert.peer != peer:
            log.warning("%s handed out an advert signed by %s; ignored", peer, advert.peer)
            return
        self._accept(advert)
