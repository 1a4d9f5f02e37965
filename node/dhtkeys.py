"""DHT provider records: one key derivation for every kind a node provides (models, relays), and
one loop that keeps them provided.

Fixed, because py-libp2p decodes a key that parses as hex or as a CID instead of using its UTF-8
bytes: a key is the hex of the sha2-256 multihash of `domain || value`, which py-libp2p decodes to
exactly that multihash. Each kind of record has its own domain, so keys of two kinds never meet.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence

import trio
from libp2p.kad_dht.kad_dht import KadDHT

log = logging.getLogger(__name__)

_SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"


def provider_key(domain: bytes, value: bytes = b"") -> str:
    """The DHT key under which the records of `domain` (and `value`, e.g. a model hash) are provided."""
    return (_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(domain + value).digest()).hex()


async def provide_forever(dht: KadDHT, keys: Sequence[str], *, interval_s: float, what: str) -> None:
    """Provide each of `keys` now and every `interval_s` (nodes that join later hold the records
    too), for as long as this runs; a failure is logged, naming `what`, and retried next round."""
    while True:
        for key in keys:
            try:
                await dht.provide(key)
            except Exception as exc:  # the next round retries
                log.warning("%s record not stored in the DHT: %s", what, exc)
        await trio.sleep(interval_s)
