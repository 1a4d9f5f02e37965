"""How clients find providers: signed adverts on gossipsub and in the DHT, and DHT provider records.

A provider announces itself three ways, all carrying the same sealed `CapabilityAdvert` (the
protocol's `Envelope` bytes, signed by the provider):

- gossip: published on ADVERT_TOPIC at start, every `interval_s`, and soon after any change (free
  slots); paced at least `min_gap_s` apart, because gossipsub silently drops more than 10 messages
  a second per peer and topic. Adverts expire, so a lost one is only late, never wrong.
- DHT value: stored under `advert_key(peer)`; the validator registered for ADVERT_NAMESPACE accepts
  only an unexpired advert signed by exactly that peer and keeps the newest.
- DHT provider record: under `model_key(model_hash)` for each model it holds.

A client subscribes to the topic and also looks up `model_key` and then each provider's advert
value, at start and every `lookup_interval_s`, so it does not depend on catching a gossip message.

DHT calls carry no timeout of ours: py-libp2p bounds each query itself, and an outer timeout
would cancel stream I/O mid-write, which breaks the connection (streams.py).

Key derivation (fixed, because py-libp2p decodes a key that parses as hex or as a CID instead of
using its UTF-8 bytes): `model_key` is the hex of the sha2-256 multihash of
`/cipherswarm/model/1/ || model_hash`, which py-libp2p decodes to exactly that multihash.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import trio
from libp2p.abc import ISubscriptionAPI
from libp2p.peer.id import ID
from libp2p.records.utils import InvalidRecordType
from libp2p.records.validator import Validator

from cipherswarm.protocol import CapabilityAdvert, ProtocolError, seal, verify_advert

from .types import ProviderAdvert

if TYPE_CHECKING:
    from .host import NodeHost

log = logging.getLogger(__name__)

ADVERT_TOPIC = "/cipherswarm/adverts/1"
ADVERT_NAMESPACE = "cipherswarm-advert"
_MODEL_KEY_DOMAIN = b"/cipherswarm/model/1/"
_SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"


def now_ms() -> int:
    return int(time.time() * 1000)


def model_key(model_hash: bytes) -> str:
    """DHT provider key of a model (module docstring)."""
    return (_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(_MODEL_KEY_DOMAIN + model_hash).digest()).hex()


def advert_key(peer: ID) -> str:
    """DHT value key of a provider's advert."""
    return f"/{ADVERT_NAMESPACE}/{peer.to_base58()}"


def read_advert(data: bytes, *, at_ms: int | None = None) -> ProviderAdvert:
    """A provider's advert from gossip or the DHT; ProtocolError or ValueError if it is not a
    valid, unexpired, signed advert."""
    return ProviderAdvert.from_verified(verify_advert(data, now_ms=now_ms() if at_ms is None else at_ms))


class AdvertValidator(Validator):
    """DHT records under ADVERT_NAMESPACE: a valid advert signed by the peer the key names."""

    def validate(self, key: str, value: bytes) -> None:
        try:
            advert = read_advert(value)
        except (ProtocolError, ValueError) as exc:
            raise InvalidRecordType(f"not a valid advert: {exc}") from None
        if key != advert_key(advert.peer):
            raise InvalidRecordType("advert stored under another peer's key")

    def select(self, key: str, values: list[bytes]) -> int:
        """The newest valid advert; invalid ones never win."""
        def issued(value: bytes) -> int:
            try:
                self.validate(key, value)
                return read_advert(value).issued_at_ms
            except InvalidRecordType:
                return -1

        return max(range(len(values)), key=lambda i: issued(values[i]))


class Advertiser:
    """Provider side: keeps the provider's advert current on gossip and in the DHT."""

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

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        subscription = await self._node.pubsub.subscribe(ADVERT_TOPIC)  # being in the mesh relays others' adverts
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_drain, subscription)
            await self._announce(dht=True)
            task_status.started()
            last_dht = trio.current_time()
            while True:
                with trio.move_on_after(self.interval_s):
                    await self._changed.wait()
                self._changed = trio.Event()
                dht = trio.current_time() - last_dht >= self.interval_s
                await self._announce(dht=dht)
                if dht:
                    last_dht = trio.current_time()
                await trio.sleep(self.min_gap_s)

    async def _announce(self, *, dht: bool) -> None:
        sealed = seal(self._advert(), self._node.key_pair.private_key).header
        try:
            await self._node.pubsub.publish(ADVERT_TOPIC, sealed)
        except Exception as exc:  # a gossip hiccup only delays the advert to the next round
            log.warning("advert not published: %s", exc)
        if not dht:
            return
        try:
            await self._node.dht.put_value(advert_key(self._node.peer_id), sealed)
            for model_hash in self._model_hashes:
                await self._node.dht.provide(model_key(model_hash))
        except Exception as exc:  # as above: the next round retries
            log.warning("advert not stored in the DHT: %s", exc)


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
            await self.lookup()
            task_status.started()
            while True:
                with trio.move_on_after(self.lookup_interval_s):
                    await self._wanted.wait()
                self._wanted = trio.Event()
                await self.lookup()

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
        try:
            value = await self._node.dht.get_value(advert_key(peer))
            if value is not None:
                self._accept(read_advert(value))
        except Exception as exc:  # an unreachable or lying peer: gossip may still bring its advert
            log.debug("no advert for %s from the DHT: %s", peer, exc)
