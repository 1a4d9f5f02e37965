"""1.2 streamed replies: the reply's header, its payload as computed, then a signed trailer with the
payload's digest and the receipt. The client's checks of the pair, each attack refused."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
from wire_factory import CLIENT, LIMITS, NOW_MS, OTHER_KEY, PAYLOAD, PROVIDER, PROVIDER_KEY, REPLY_PAYLOAD, accept, request_frame

from cipherswarm.protocol import (
    BadSignature,
    Frame,
    MalformedFrame,
    MatmulReply,
    ReplyTrailer,
    Sealed,
    decode_frame,
    encode_frame,
    frame_head,
    ok_reply,
    reply_trailer,
    seal,
    sha256,
    streamed_reply,
    verify_reply,
)
from cipherswarm.protocol.messages import MatmulRequest, decode_body, encode_body
from cipherswarm.protocol.receipts import sign_receipt


def streamed_frames(sealed: Sealed[MatmulRequest], payload: bytes = REPLY_PAYLOAD, *, trailer_key: Any = PROVIDER_KEY,
                    price: int = 800, **trailer_changes: Any) -> tuple[bytes, bytes]:
    """The provider's streamed reply as it goes on the wire: head frame (header and payload), trailer frame."""
    verified = accept(encode_frame(sealed, PAYLOAD))
    head = seal(streamed_reply(verified, len(payload)), PROVIDER_KEY)
    trailer = reply_trailer(verified, sha256(payload), key=PROVIDER_KEY, price_per_gmac=price, compute_time_us=77,
                            now_ms=NOW_MS)
    trailer = dataclasses.replace(trailer, **trailer_changes)
    return frame_head(head) + payload, encode_frame(seal(trailer, trailer_key))


def read(head: bytes, trailer: bytes | None) -> Frame:
    """What the client's stream reader returns: the reply frame with its trailer's header."""
    frame = decode_frame(head, limits=LIMITS)
    return frame if trailer is None else Frame(frame.header, frame.payload, trailer=decode_frame(trailer, limits=LIMITS).header)


def test_a_streamed_reply_verifies_as_the_one_frame_reply_would() -> None:
    sealed, _ = request_frame()
    head, trailer = streamed_frames(sealed)
    frame = read(head, trailer)
    assert isinstance(frame.header.message, MatmulReply) and frame.header.message.streamed
    verified = verify_reply(frame, peer=PROVIDER, request=sealed)
    assert verified.payload == REPLY_PAYLOAD and not verified.message.streamed
    assert verified.message.compute_time_us == 77 and verified.message.payload_sha256 == sha256(REPLY_PAYLOAD)
    receipt = verified.message.receipt
    assert receipt is not None and receipt.receipt.reply_digest == sha256(REPLY_PAYLOAD)
    assert (receipt.receipt.client, receipt.receipt.macs) == (CLIENT, sealed.message.macs)


def test_a_streamed_reply_without_its_trailer_is_refused() -> None:
    sealed, _ = request_frame()
    head, _ = streamed_frames(sealed)
    with pytest.raises(MalformedFrame, match="without its trailer"):
        verify_reply(read(head, None), peer=PROVIDER, request=sealed)


def test_a_trailer_after_a_one_frame_reply_is_refused() -> None:
    sealed, _ = request_frame()
    verified = accept(encode_frame(sealed, PAYLOAD))
    reply = ok_reply(verified, REPLY_PAYLOAD, key=PROVIDER_KEY, price_per_gmac=800, compute_time_us=1, now_ms=NOW_MS)
    _, trailer = streamed_frames(sealed)
    with pytest.raises(MalformedFrame, match="not streamed"):
        verify_reply(read(encode_frame(seal(reply, PROVIDER_KEY), REPLY_PAYLOAD), trailer), peer=PROVIDER, request=sealed)


def test_a_trailer_signed_by_another_peer_is_refused() -> None:
    sealed, _ = request_frame()
    head, trailer = streamed_frames(sealed, trailer_key=OTHER_KEY)
    with pytest.raises(BadSignature):
        verify_reply(read(head, trailer), peer=PROVIDER, request=sealed)


def test_a_trailer_naming_another_request_is_refused() -> None:
    sealed, _ = request_frame()
    other, _ = request_frame()  # another request id and digest
    head, _ = streamed_frames(sealed)
    _, trailer = streamed_frames(other)
    with pytest.raises(BadSignature):
        verify_reply(read(head, trailer), peer=PROVIDER, request=sealed)


def test_a_payload_changed_on_the_way_is_refused() -> None:
    sealed, _ = request_frame()
    head, trailer = streamed_frames(sealed)
    tampered = head[:-1] + bytes([head[-1] ^ 1])
    with pytest.raises(BadSignature):
        verify_reply(read(tampered, trailer), peer=PROVIDER, request=sealed)


def test_a_trailer_digest_other_than_its_receipts_is_refused() -> None:
    sealed, _ = request_frame()
    head, trailer = streamed_frames(sealed, payload_sha256=sha256(b"another payload"))
    with pytest.raises(BadSignature):
        verify_reply(read(head, trailer), peer=PROVIDER, request=sealed)


def test_a_trailer_overbilling_is_refused() -> None:
    sealed, _ = request_frame()  # offers 1000 per GMAC
    verified = accept(encode_frame(sealed, PAYLOAD))
    honest = reply_trailer(verified, sha256(REPLY_PAYLOAD), key=PROVIDER_KEY, price_per_gmac=800, compute_time_us=1,
                           now_ms=NOW_MS)
    dearer = dataclasses.replace(honest.receipt.receipt, price_per_gmac=2000)
    head, trailer = streamed_frames(sealed, receipt=sign_receipt(dearer, PROVIDER_KEY))
    with pytest.raises(BadSignature):
        verify_reply(read(head, trailer), peer=PROVIDER, request=sealed)


@pytest.mark.parametrize("change", [{"payload_sha256": bytes(32)}, {"compute_time_us": 5}, {"receipt": "issued"}])
def test_a_streamed_reply_header_carries_no_digest_time_or_receipt(change: dict[str, Any]) -> None:
    sealed, _ = request_frame()
    verified = accept(encode_frame(sealed, PAYLOAD))
    head = streamed_reply(verified, 10)
    if change.get("receipt") == "issued":
        change = {"receipt": ok_reply(verified, b"x", key=PROVIDER_KEY, price_per_gmac=1, compute_time_us=0,
                                      now_ms=NOW_MS).receipt}
    with pytest.raises(ValueError):
        dataclasses.replace(head, **change)


def test_the_trailer_round_trips_and_is_a_body_kind_of_its_own() -> None:
    sealed, _ = request_frame()
    verified = accept(encode_frame(sealed, PAYLOAD))
    trailer = reply_trailer(verified, sha256(b"p"), key=PROVIDER_KEY, price_per_gmac=3, compute_time_us=9, now_ms=NOW_MS)
    body = encode_body(trailer)
    assert body[0] == (5 << 3) | 2  # Body field 5, length-delimited
    assert decode_body(body) == trailer and isinstance(trailer, ReplyTrailer)
