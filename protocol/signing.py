"""Ed25519 identities and signatures with domain separation, without libp2p.

A node's identity key is an Ed25519 key (pyca `cryptography`); its libp2p peer id is derived here,
byte for byte as libp2p derives it, so the protocol neither imports libp2p nor trusts another
library's idea of what a peer id is: the node converts its libp2p key and peer ids at its boundary
(node/identity.py). Peer ids are the multihash bytes.

Signature input (README, "Signatures"), the same shape as libp2p's signed envelopes (RFC 0002):

    uvarint(len(domain)) || domain || uvarint(len(data)) || data

`data` is always a byte string exactly as it travels (a Body, a UsageReceipt), never a re-encoding:
protobuf encodings are not canonical across implementations, so a verifier that re-serialized would
reject honest peers written in other languages. The domain keeps a signature made for one purpose
(a frame header, a provider's receipt, a client's countersignature) from being valid for another,
or for any other use of the same identity key (libp2p's own records, the Noise handshake).
"""

from __future__ import annotations

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadSignature
from .varint import encode_uvarint

HEADER_DOMAIN = b"/cipherswarm/matmul/1/header"
RECEIPT_PROVIDER_DOMAIN = b"/cipherswarm/matmul/1/receipt/provider"
RECEIPT_CLIENT_DOMAIN = b"/cipherswarm/matmul/1/receipt/client"

SIGNATURE_SIZE = 64
KEY_SIZE = 32  # an RFC 8032 public key (or private seed)
# libp2p's PublicKey protobuf for an Ed25519 key: field 1 (Type) = 1 (Ed25519), field 2 (Data) of
# 32 bytes. Accepting only this exact form keeps key parsing trivial and the key-to-peer-id binding
# unambiguous; RSA and secp256k1 identities are refused.
_ED25519_KEY_PREFIX = bytes([0x08, 0x01, 0x12, KEY_SIZE])
PUBLIC_KEY_SIZE = len(_ED25519_KEY_PREFIX) + KEY_SIZE
# A libp2p peer id of a key this short is the identity multihash of the key's protobuf: code 0x00,
# then the length (36), then the 36 bytes (libp2p peer-ids spec, "inline keys").
_PEER_ID_PREFIX = bytes([0x00, PUBLIC_KEY_SIZE])
PEER_ID_SIZE = len(_PEER_ID_PREFIX) + PUBLIC_KEY_SIZE

# Strict verification, as libsodium's (README, "Signatures"): OpenSSL already refuses a
# non-canonical S, but accepts public keys and signature points R of small order, whose signatures
# anyone can forge, and non-canonical key encodings. These are the y coordinates of every point of
# order 1, 2, 4 or 8, with p and p + 1 (non-canonical encodings of 0 and 1): libsodium's list.
_P = 2**255 - 19
_Y_MASK = (1 << 255) - 1  # the top bit of an encoded point is the sign of x
_SMALL_ORDER_Y = frozenset({
    0, 1, _P - 1, _P, _P + 1,
    0x05FC536D880238B13933C6D305ACDFD5F098EFF289F4C345B027B2C28F95E826,  # order 8
    0x7A03AC9277FDC74EC6CC392CFA53202A0F67100D760B3CBA4FD84D3D706A17C7,  # order 8
})


def _small_order(point: bytes) -> bool:
    return int.from_bytes(point, "little") & _Y_MASK in _SMALL_ORDER_Y


def signature_input(domain: bytes, data: bytes) -> bytes:
    return encode_uvarint(len(domain)) + domain + encode_uvarint(len(data)) + data


def sign(key: Ed25519PrivateKey, domain: bytes, data: bytes) -> bytes:
    if not isinstance(key, Ed25519PrivateKey):
        raise TypeError("key must be an Ed25519PrivateKey (cryptography)")
    return key.sign(signature_input(domain, data))


def _require_ed25519(key: Ed25519PublicKey) -> None:
    if not isinstance(key, Ed25519PublicKey):
        raise TypeError("key must be an Ed25519PublicKey (cryptography)")


def encode_public_key(key: Ed25519PublicKey) -> bytes:
    """The key as it travels: libp2p's PublicKey protobuf, the bytes its peer id is derived from."""
    _require_ed25519(key)
    return _ED25519_KEY_PREFIX + key.public_bytes_raw()


def decode_public_key(data: bytes) -> Ed25519PublicKey:
    """The key from its wire form; BadSignature unless it is an Ed25519 key in libp2p's exact form,
    canonically encoded and not of small order (such a key's signatures can be forged)."""
    if len(data) != PUBLIC_KEY_SIZE or not data.startswith(_ED25519_KEY_PREFIX):
        raise BadSignature("public key is not a libp2p Ed25519 key")
    raw = data[len(_ED25519_KEY_PREFIX) :]
    if int.from_bytes(raw, "little") & _Y_MASK >= _P or _small_order(raw):
        raise BadSignature("public key is not canonical or has small order")
    return Ed25519PublicKey.from_public_bytes(raw)


def peer_id(key: Ed25519PublicKey) -> bytes:
    """The key's libp2p peer id (multihash bytes, base58 `12D3KooW...`), as libp2p's
    `ID.from_pubkey` derives it."""
    return _PEER_ID_PREFIX + encode_public_key(key)


def peer_key(peer: bytes) -> Ed25519PublicKey:
    """The identity key an Ed25519 peer id embeds, which is how a receipt's two peer ids name the
    keys that must verify it; BadSignature for any other peer id."""
    if len(peer) != PEER_ID_SIZE or not peer.startswith(_PEER_ID_PREFIX):
        raise BadSignature("peer id does not embed an Ed25519 key")
    return decode_public_key(peer[len(_PEER_ID_PREFIX) :])


def verify(key: Ed25519PublicKey, domain: bytes, data: bytes, signature: bytes) -> None:
    """Raise BadSignature unless `signature` is `key`'s signature of `data` under `domain`."""
    _require_ed25519(key)
    if len(signature) != SIGNATURE_SIZE:
        raise BadSignature(f"signature must be {SIGNATURE_SIZE} bytes")
    if _small_order(signature[:KEY_SIZE]):
        raise BadSignature("signature does not verify")
    try:
        key.verify(signature, signature_input(domain, data))
    except InvalidSignature:
        raise BadSignature("signature does not verify") from None


def require_peer(key: Ed25519PublicKey, peer: bytes) -> None:
    """Raise BadSignature unless `key` is `peer`'s identity key (peer id = multihash of the key)."""
    if peer_id(key) != peer:
        raise BadSignature("signing key does not belong to the expected peer")
