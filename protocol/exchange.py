"""The checks a receiver runs on each kind of frame, and the replies a provider builds.

Each `verify_*` runs its checks cheapest first and authenticity before anything that keeps state or
costs work: the frame's kind, then the signature and the signer's binding to the stream's peer,
then the payload's digest and length, then freshness (which records the nonce), then what the
frame asks for. It returns a `Verified` record or raises one typed ProtocolError; a provider turns
that error into its reply with `error_reply`.

Flow on one stream (README, "Exchange"): the client sends a request frame; the provider answers
with one reply frame (from 1.2 it may stream it: the reply's header, its payload as computed, then
a ReplyTrailer frame with the payload's digest and the receipt); after checking the result the
client may send the countersigned receipt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Generic, TypeVar

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from .envelope import Header, Sealed, decode_header
from .errors import BadSignature, FrameTooLarge, MalformedFrame, PaymentRequired, UnknownModel, WireError
from .framing import MAX_HEADER_SIZE, Frame
from .messages import (
    CapabilityAdvert,
    MatmulReply,
    MatmulRequest,
    Message,
    ReplyTrailer,
    SignedReceipt,
    UsageReceipt,
    sha256,
)
from .receipts import sign_receipt, verify_countersignature, verify_receipt
from .replay import ReplayWindow, check_expiry
from .shapes import LayerShape, check_shapes
from .signing import decode_public_key, peer_id

M = TypeVar("M", bound=Message)

LayerLookup = Callable[[bytes, tuple[str, ...]], LayerShape | None]
"""(model hash, layer names) -> the shape of their column concatenation (one name: the layer's
shape), or None if the provider does not hold them all or they differ in input width."""


@dataclass(frozen=True, slots=True)
class Verified(Generic[M]):
    """A message whose signature, signer and payload have been checked."""

    message: M
    signer: bytes  # the peer id whose identity key signed the header
    digest: bytes  # SHA-256 of the header's Body bytes
    payload: bytes


def _expect(header: Header, kind: type[M]) -> M:
    if not isinstance(header.message, kind):
        raise MalformedFrame(f"expected a {kind.__name__}, got a {type(header.message).__name__}")
    return header.message


def _check_payload(message: MatmulRequest | MatmulReply, payload: bytes, digest: bytes | None) -> None:
    """`digest`: the payload's SHA-256 if the caller computed it (a node hashes layer-sized payloads
    in a worker thread, where they do not stall its event loop), else None to compute it here."""
    if len(payload) != message.payload_length or (sha256(payload) if digest is None else digest) != message.payload_sha256:
        raise BadSignature("payload does not match the header's digest")


def check_request_header(
    header: Header,
    *,
    peer: bytes,
    window: ReplayWindow,
    lookup: LayerLookup,
    now_ms: int,
    min_price_per_gmac: int = 0,
    min_contraction: int = 1,
    group: bytes | None = None,
    check: Callable[[MatmulRequest], None] | None = None,
) -> Verified[MatmulRequest]:
    """Provider side, before a byte of the payload is read: check the header of a request read from
    a stream whose remote peer is `peer`, cheapest first (README section 8).

    The signature and the signer's binding to `peer` (BadSignature), the expiry (ExpiredFrame), the
    model and layers held (UnknownModel), the slice and shapes (ShapeMismatch; ContractionTooThin
    below `min_contraction`), the offered price (PaymentRequired) and `check`, the receiver's own
    checks of what the header names (a provider's: the backend and its parameters,
    UnsupportedParams; the payload length and the reply's size, ShapeMismatch and ReplyTooLarge); only then the nonce, which is recorded in
    `window` under the signer's key and `group` (the sender's network address, or None) unless it
    is a replay (ReplayedFrame) or over the key's, the group's or the window's share (Busy). A
    request refused by any check before the nonce leaves nothing in the window. The result's
    payload is empty: read it, then check_request_payload.
    """
    request = _expect(header, MatmulRequest)
    signer = header.verify(peer)
    check_expiry(request.expires_at_ms, now_ms=now_ms, max_ttl_ms=window.max_ttl_ms)
    layer = lookup(request.model_hash, request.layers)
    if layer is None:
        raise UnknownModel(request.model_hash, "+".join(request.layers))
    check_shapes(request, layer, min_contraction=min_contraction)
    if request.price_per_gmac < min_price_per_gmac:
        raise PaymentRequired(asked=min_price_per_gmac, offered=request.price_per_gmac)
    if check is not None:
        check(request)
    window.check_and_record(
        request.nonce, expires_at_ms=request.expires_at_ms, now_ms=now_ms, scope=header.public_key, group=group
    )
    return Verified(request, signer, header.digest, b"")


def check_request_payload(
    request: Verified[MatmulRequest], payload: bytes, *, payload_sha256: bytes | None = None
) -> Verified[MatmulRequest]:
    """Provider side: the request checked by check_request_header with its payload, once the payload
    matches the header's length and SHA-256 (BadSignature otherwise; `payload_sha256`: the payload's
    SHA-256 if already computed, see _check_payload). The nonce stays used up either way."""
    _check_payload(request.message, payload, payload_sha256)
    return replace(request, payload=payload)


def verify_request(
    frame: Frame,
    *,
    peer: bytes,
    window: ReplayWindow,
    lookup: LayerLookup,
    now_ms: int,
    min_price_per_gmac: int = 0,
    min_contraction: int = 1,
    payload_sha256: bytes | None = None,
    group: bytes | None = None,
    check: Callable[[MatmulRequest], None] | None = None,
) -> Verified[MatmulRequest]:
    """Provider side: check a whole request frame read from a stream whose remote peer is `peer`:
    check_request_header, then check_request_payload, in the order a provider reading the payload
    only after the header runs them (README section 8).

    Raises MalformedFrame, BadSignature, ExpiredFrame, UnknownModel, ShapeMismatch, PaymentRequired,
    what `check` raises, ReplayedFrame or Busy (replay window share full), then BadSignature for a
    payload that does not match. The nonce is used up once every check before it passed, even if the payload then fails.
    """
    request = check_request_header(
        frame.header, peer=peer, window=window, lookup=lookup, now_ms=now_ms, min_price_per_gmac=min_price_per_gmac,
        min_contraction=min_contraction, group=group, check=check,
    )
    return check_request_payload(request, frame.payload, payload_sha256=payload_sha256)


def _receipt(request: Verified[MatmulRequest], reply_digest: bytes, *, key: Ed25519PrivateKey, price_per_gmac: int,
             now_ms: int) -> SignedReceipt:
    """The receipt for `request`'s macs at `price_per_gmac`, binding the reply payload's SHA-256."""
    if price_per_gmac > request.message.price_per_gmac:
        raise ValueError("price_per_gmac must not exceed the request's offer")
    receipt = UsageReceipt(
        provider=peer_id(key.public_key()),
        client=request.signer,
        request_id=request.message.request_id,
        request_digest=request.digest,
        reply_digest=reply_digest,
        macs=request.message.macs,
        price_per_gmac=price_per_gmac,
        completed_at_ms=now_ms,
    )
    return sign_receipt(receipt, key)


def ok_reply(
    request: Verified[MatmulRequest],
    payload: bytes,
    *,
    key: Ed25519PrivateKey,
    price_per_gmac: int,
    compute_time_us: int,
    now_ms: int,
    payload_sha256: bytes | None = None,
) -> MatmulReply:
    """Provider side: the reply carrying `payload` (the encrypted result) and a receipt signed with
    the provider's identity `key` for request.message.macs at `price_per_gmac`. `payload_sha256`:
    the payload's SHA-256 if already computed (see _check_payload)."""
    reply_digest = sha256(payload) if payload_sha256 is None else payload_sha256
    return MatmulReply(
        request_id=request.message.request_id,
        request_digest=request.digest,
        payload_sha256=reply_digest,
        payload_length=len(payload),
        compute_time_us=compute_time_us,
        receipt=_receipt(request, reply_digest, key=key, price_per_gmac=price_per_gmac, now_ms=now_ms),
    )


def streamed_reply(request: Verified[MatmulRequest], payload_length: int) -> MatmulReply:
    """Provider side, 1.2: the header of a reply whose `payload_length` bytes follow as they are
    computed; reply_trailer follows them."""
    return MatmulReply(request_id=request.message.request_id, request_digest=request.digest, payload_sha256=b"",
                       payload_length=payload_length, streamed=True)


def reply_trailer(
    request: Verified[MatmulRequest],
    payload_sha256: bytes,
    *,
    key: Ed25519PrivateKey,
    price_per_gmac: int,
    compute_time_us: int,
    now_ms: int,
) -> ReplyTrailer:
    """Provider side, 1.2: the trailer of a streamed reply whose payload had SHA-256
    `payload_sha256`, with its receipt (as ok_reply's)."""
    return ReplyTrailer(
        request_id=request.message.request_id,
        request_digest=request.digest,
        payload_sha256=payload_sha256,
        compute_time_us=compute_time_us,
        receipt=_receipt(request, payload_sha256, key=key, price_per_gmac=price_per_gmac, now_ms=now_ms),
    )


def error_reply(exc: BaseException, frame: Frame | Header | None = None) -> MatmulReply:
    """Provider side: the reply to a request that failed with `exc`. Pass the frame, or its header
    if only the header was read, so the reply names the request; a non-ProtocolError is sent as a
    bare INTERNAL."""
    request_id = request_digest = b""
    header = frame.header if isinstance(frame, Frame) else frame
    if header is not None and isinstance(header.message, MatmulRequest):
        request_id, request_digest = header.message.request_id, header.digest
    return MatmulReply(
        request_id=request_id,
        request_digest=request_digest,
        payload_sha256=sha256(b""),
        payload_length=0,
        error=WireError.from_exception(exc),
    )


def verify_reply(
    frame: Frame, *, peer: bytes, request: Sealed[MatmulRequest], payload_sha256: bytes | None = None
) -> Verified[MatmulReply]:
    """Client side: check the reply to `request` read from a stream to provider `peer`
    (`payload_sha256`: SHA-256 of frame.payload if already computed, see _check_payload).

    An error reply is raised as the provider's typed error (with `remote` set). A successful one
    must name the request, match its payload, and carry a receipt signed by `peer` for this client,
    this request and this payload that charges exactly request.message.macs at no more than the
    offered price. BadSignature if any of that fails.

    A streamed reply (1.2) must come with its trailer (`frame.trailer`), signed by `peer` and naming
    the same request; its digest, compute time and receipt are then checked as a one-frame reply's,
    and the result's message is the reply as one frame would have carried it. A trailer missing, or
    after a reply that is not streamed: MalformedFrame.
    """
    reply = _expect(frame.header, MatmulReply)
    signer = frame.header.verify(peer)
    if reply.streamed:
        if frame.trailer is None:
            raise MalformedFrame("a streamed reply without its trailer")
        trailer = _expect(frame.trailer, ReplyTrailer)
        frame.trailer.verify(peer)
        if (trailer.request_id, trailer.request_digest) != (reply.request_id, reply.request_digest):
            raise BadSignature("trailer names another request")
        reply = replace(reply, streamed=False, payload_sha256=trailer.payload_sha256,
                        compute_time_us=trailer.compute_time_us, receipt=trailer.receipt)
    elif frame.trailer is not None:
        raise MalformedFrame("a trailer after a reply that is not streamed")
    _check_payload(reply, frame.payload, payload_sha256)
    sent = request.message
    names_request = (reply.request_id, reply.request_digest) == (sent.request_id, request.digest)
    if reply.error is not None:
        # A provider that could not decode the request cannot name it; the stream binds the reply.
        if reply.request_id and not names_request:
            raise BadSignature("reply names another request")
        raise reply.error.to_exception()
    if not names_request:
        raise BadSignature("reply names another request")
    assert reply.receipt is not None  # MatmulReply guarantees a receipt on success
    receipt = verify_receipt(reply.receipt, provider_key=decode_public_key(frame.header.public_key))
    expected = (request.signer, sent.request_id, request.digest, reply.payload_sha256, sent.macs)
    got = (receipt.client, receipt.request_id, receipt.request_digest, receipt.reply_digest, receipt.macs)
    if got != expected or receipt.price_per_gmac > sent.price_per_gmac:
        raise BadSignature("receipt does not match the request and reply")
    return Verified(reply, signer, frame.header.digest, frame.payload)


def verify_receipt_ack(frame: Frame, *, peer: bytes, issued: SignedReceipt) -> SignedReceipt:
    """Provider side: check the countersigned receipt a client sent back for the receipt `issued`."""
    ack = _expect(frame.header, SignedReceipt)
    frame.header.verify(peer)
    if (ack.receipt_bytes, ack.provider_signature) != (issued.receipt_bytes, issued.provider_signature):
        raise BadSignature("not the receipt that was issued")
    verify_countersignature(ack, decode_public_key(frame.header.public_key))
    return ack


def verify_advert(data: bytes, *, now_ms: int, max_ttl_ms: int = 600_000) -> Verified[CapabilityAdvert]:
    """Check a gossiped advert (a sealed header with no framing): signed by its provider, which is
    `signer` in the result, and expiring within (now_ms, now_ms + max_ttl_ms]."""
    if len(data) > MAX_HEADER_SIZE:
        raise FrameTooLarge(MAX_HEADER_SIZE, len(data), what="advert")
    header = decode_header(data)
    advert = _expect(header, CapabilityAdvert)
    signer = header.verify()
    check_expiry(advert.expires_at_ms, now_ms=now_ms, max_ttl_ms=max_ttl_ms)
    return Verified(advert, signer, header.digest, b"")
