"""DHT provider keys: one derivation for every kind of record a node provides (models, relays).

Fixed, because py-libp2p decodes a key that parses as hex or as a CID instead of using its UTF-8
bytes: a key is the hex of the sha2-256 multihash of `domain || value`, which py-libp2p decodes to
exactly that multihash. Each kind of record has its own domain, so keys of two kinds never meet.
"""

from __future__ import annotations

import hashlib

_SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"


def provider_key(domain: bytes, value: bytes = b"") -> str:
    """The DHT key under which the records of `domain` (and `value`, e.g. a model hash) are provided."""
    return (_SHA2_256_MULTIHASH_PREFIX + hashlib.sha256(domain + value).digest()).hex()
