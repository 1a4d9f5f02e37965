"""The signed header: sealing a message under a node's identity key, and decoding a peer's header.

An Envelope is three byte fields, public_key, body and signature, and is the only unsigned data on
the wire. `decode_header` therefore accepts exactly one encoding of it (known fields, in order, each
once, empty ones omitted, as proto3 writes them) and rejects anything else, so a frame cannot be
altered in transit without the change being refused. Extension points for later minor versions
are inside the signed Body, never in the envelope.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from google.protobuf.message import DecodeError

from . import cipherswarm_matmul_v1_pb2 as pb
from .errors import MalformedFrame
from .messages import Message, decode_body, encode_body, sha256
from .signing import HEADER_DOMAIN, decode_public_key, encode_public_key, peer_id, require_peer, sign, verify

M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Sealed(Generic[M]):
    """A message signed for sending. Keep a sealed request: its digest identifies it in the reply."""

    message: M
    header: bytes  # the serialized Envelope, as sent after the length prefix
    digest: bytes  # SHA-256 of the Body bytes, what replies and receipts refer to
    signer: bytes  # the sealing key's peer id


@dataclass(frozen=True, kw_only=True, slots=True)
class Header:
    """A peer's decoded header whose signature is not checked yet: call `verify` before trusting it."""

    public_key: bytes  # as received; checked by `verify`
    body: bytes  # the signed bytes
    signature: bytes
    message: Message  # decoded from `body`

    @property
    def digest(self) -> bytes:
        return sha256(self.body)

    def verify(self, peer: bytes | None = None) -> bytes:
        """Check the signature, and that it is `peer`'s if given; return the signer's peer id.

        On a stream, pass the stream's remote peer (authenticated by the Noise handshake): a frame
        signed by anyone else, even validly, is then refused, which stops relaying another peer's
        frames. Raises BadSignature, whatever failed.
        """
        key = decode_public_key(self.public_key)
        if peer is not None:
            require_peer(key, peer)
        verify(key, HEADER_DOMAIN, self.body, self.signature)
        return peer_id(key)


def seal(message: M, key: Ed25519PrivateKey) -> Sealed[M]:
    body = encode_body(message)
    signature = sign(key, HEADER_DOMAIN, body)  # refuses any key but Ed25519
    public_key = key.public_key()
    envelope = pb.Envelope(public_key=encode_public_key(public_key), body=body, signature=signature)
    return Sealed(message, envelope.SerializeToString(), sha256(body), peer_id(public_key))


def decode_header(data: bytes) -> Header:
    """Decode a header (an Envelope and its Body); MalformedFrame unless both are valid."""
    envelope = pb.Envelope()
    try:
        envelope.ParseFromString(data)
    except DecodeError as exc:
        raise MalformedFrame(f"envelope does not decode: {exc}") from None
    # Rebuilt from the known fields only, so unknown, repeated or reordered fields all differ.
    canonical = pb.Envelope(public_key=envelope.public_key, body=envelope.body, signature=envelope.signature)
    if canonical.SerializeToString() != data:
        raise MalformedFrame("envelope is not canonically encoded")
    return Header(
        public_key=envelope.public_key,
        body=envelope.body,
        signature=envelope.signature,
        message=decode_body(envelope.body),
    )
