"""Ed25519 signatures with domain separation, under a node's libp2p identity key.

Signature input (README, "Signatures"), the same shape as libp2p's signed envelopes (RFC 0002):

    uvarint(len(domain)) || domain || uvarint(len(data)) || data

`data` is always a byte string exactly as it travels (a Body, a UsageReceipt), never a re-encoding:
protobuf encodings are not canonical across implementations, so a verifier that re-serialized would
reject honest peers written in other languages. The domain keeps a signature made for one purpose
(a frame header, a provider's receipt, a client's countersignature) from being valid for another,
or for any other use of the same identity key (libp2p's own records, the Noise handshake).
"""

from __future__ import annotations

from libp2p.crypto.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.peer.id import ID

from .errors import BadSignature
from .varint import encode_uvarint

HEADER_DOMAIN = b"/cipherswarm/matmul/1/header"
RECEIPT_PROVIDER_DOMAIN = b"/cipherswarm/matmul/1/receipt/provider"
RECEIPT_CLIENT_DOMAIN = b"/cipherswarm/matmul/1/receipt/client"

SIGNATURE_SIZE = 64
# libp2p's PublicKey protobuf for an Ed25519 key: field 1 (Type) = 1 (Ed25519), field 2 (Data) of
# 32 bytes. Accepting only this exact form keeps key parsing trivial and the key-to-peer-id binding
# unambiguous; RSA and secp256k1 identities are refused.
_ED25519_KEY_PREFIX = bytes([0x08, 0x01, 0x12, 0x20])
PUBLIC_KEY_SIZE = len(_ED25519_KEY_PREFIX) + 32


def signature_input(domain: bytes, data: bytes) -> bytes:
    return encode_uvarint(len(domain)) + domain + encode_uvarint(len(data)) + data


def sign(key: Ed25519PrivateKey, domain: bytes, data: bytes) -> bytes:
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("key must be a libp2p Ed25519PrivateKey")
    return key.sign(signature_input(domain, data))


def _require_ed25519(key: Ed25519PublicKey) -> None:
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError("key must be a libp2p Ed25519PublicKey")


def encode_public_key(key: Ed25519PublicKey) -> bytes:
    """The key as it travels: libp2p's PublicKey protobuf, the bytes its peer id is derived from."""
    _require_ed25519(key)
    return key.serialize()


def decode_public_key(data: bytes) -> Ed25519PublicKey:
    if len(data) != PUBLIC_KEY_SIZE or not data.startswith(_ED25519_KEY_PREFIX):
        raise BadSignature("public key is not a libp2p Ed25519 key")
    return Ed25519PublicKey.from_bytes(data[len(_ED25519_KEY_PREFIX) :])


def verify(key: Ed25519PublicKey, domain: bytes, data: bytes, signature: bytes) -> None:
    """Raise BadSignature unless `signature` is `key`'s signature of `data` under `domain`."""
    _require_ed25519(key)
    if len(signature) != SIGNATURE_SIZE:
        raise BadSignature(f"signature must be {SIGNATURE_SIZE} bytes")
    if not key.verify(signature_input(domain, data), signature):
        raise BadSignature("signature does not verify")


def require_peer(key: Ed25519PublicKey, peer: ID) -> None:
    """Raise BadSignature unless `key` is `peer`'s identity key (peer id = multihash of the key)."""
    _require_ed25519(key)
    if ID.from_pubkey(key) != peer:
        raise BadSignature("signing key does not belong to the expected peer")
