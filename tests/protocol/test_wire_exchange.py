"""One request, its reply and the receipt going back: the checks of each side, end to end."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import pytest
from wire_factory import (
    GROUP_NAMES,
    CLIENT,
    CLIENT_KEY,
    LAYER_NAME,
    LIMITS,
    MODEL,
    NOW_MS,
    OTHER,
    OTHER_KEY,
    PAYLOAD,
    PROVIDER,
    PROVIDER_KEY,
    REPLY_PAYLOAD,
    accept,
    lookup,
    make_advert,
    reply_frame,
    request_frame,
)

from cipherswarm.protocol import (
    BadSignature,
    Busy,
    DeadlineExceeded,
    ExpiredFrame,
    FrameTooLarge,
    InternalError,
    MalformedFrame,
    MatmulReply,
    MatmulRequest,
    PaymentRequired,
    Range,
    ReplayWindow,
    Sealed,
    ShapeMismatch,
    UnknownModel,
    UnsupportedParams,
    UsageReceipt,
    WeightSlice,
    countersign_receipt,
    decode_frame,
    encode_frame,
    error_reply,
    ok_reply,
    seal,
    sign_receipt,
    verify_advert,
    verify_receipt,
    verify_receipt_ack,
    verify_reply,
    verify_request,
)
from cipherswarm.protocol.messages import sha256


def client_reads(data: bytes, sealed: Sealed[MatmulRequest], peer: Any = PROVIDER) -> MatmulReply:
    return verify_reply(decode_frame(data, limits=LIMITS), peer=peer, request=sealed).message


class TestFullExchange:
    def test_request_reply_and_countersigned_receipt(self) -> None:
        sealed, data = request_frame()
        # provider
        request = accept(data)
        assert (request.message, request.signer, request.digest, request.payload) == (
            sealed.message,
            CLIENT,
            sealed.digest,
            PAYLOAD,
        )
        reply = ok_reply(request, REPLY_PAYLOAD, key=PROVIDER_KEY, price_per_gmac=800, compute_time_us=5, now_ms=NOW_MS)
        # client
        verified = verify_reply(
            decode_frame(encode_frame(seal(reply, PROVIDER_KEY), REPLY_PAYLOAD), limits=LIMITS),
            peer=PROVIDER,
            request=sealed,
        )
        assert verified.payload == REPLY_PAYLOAD and verified.message.compute_time_us == 5
        issued = verified.message.receipt
        assert issued is not None
        receipt = issued.receipt
        assert (receipt.provider, receipt.client, receipt.request_id, receipt.request_digest) == (
            PROVIDER,
            CLIENT,
            sealed.message.request_id,
            sealed.digest,
        )
        assert (receipt.reply_digest, receipt.macs, receipt.price_per_gmac) == (sha256(REPLY_PAYLOAD), 4 * 16 * 32, 800)
        ack = countersign_receipt(issued, CLIENT_KEY)
        # provider, then anyone holding both public keys
        returned = verify_receipt_ack(decode_frame(encode_frame(seal(ack, CLIENT_KEY)), limits=LIMITS), peer=CLIENT, issued=issued)
        assert returned == ack
        assert verify_receipt(
            returned, provider_key=PROVIDER_KEY.public_key(), client_key=CLIENT_KEY.public_key()
        ) == receipt

    def test_a_reply_is_not_a_request(self) -> None:
        sealed, _ = request_frame()
        with pytest.raises(MalformedFrame, match="expected a MatmulRequest"):
            accept(reply_frame(sealed))


class TestProviderChecks:
    @pytest.mark.parametrize(("model_hash", "layer"), [(sha256(b"other"), LAYER_NAME), (MODEL, "lm_head")])
    def test_unknown_model_or_layer(self, model_hash: bytes, layer: str) -> None:
        _, data = request_frame(model_hash=model_hash, layer=layer)
        with pytest.raises(UnknownModel) as caught:
            accept(data)
        assert (caught.value.model_hash, caught.value.layer) == (model_hash, layer)

    @pytest.mark.parametrize(
        "change",
        [
            pytest.param({"weight_slice": WeightSlice(rows=Range(60, 65), cols=Range(0, 8))}, id="rows outside"),
            pytest.param({"weight_slice": WeightSlice(rows=Range(0, 16), cols=Range(40, 49))}, id="cols outside"),
            pytest.param({"input_shape": (4, 15)}, id="contraction"),
            pytest.param({"output_shape": (4, 31)}, id="output columns"),
            pytest.param({"output_shape": (5, 32)}, id="token rows"),
            pytest.param({"transpose": True}, id="forward shapes on a transposed slice"),
        ],
    )
    def test_shape_mismatch(self, change: dict[str, Any]) -> None:
        _, data = request_frame(**change)
        with pytest.raises(ShapeMismatch):
            accept(data)

    def test_transposed_slice_for_the_backward_pass(self) -> None:
        _, data = request_frame(transpose=True, input_shape=(4, 32), output_shape=(4, 16))
        assert accept(data).message.macs == 4 * 32 * 16

    def test_a_group_is_the_concatenation_of_its_layers(self) -> None:
        """1.1: W = [W_q | W_k | W_v] (48 + 16 + 16 columns): a slice reaching into k and v is
        inside it, forward and transposed, and the group survives the round trip signed."""
        cols = WeightSlice(rows=Range(0, 64), cols=Range(40, 80))
        _, data = request_frame(group=GROUP_NAMES, weight_slice=cols, input_shape=(4, 64), output_shape=(4, 40))
        request = accept(data).message
        assert request.layers == (LAYER_NAME, *GROUP_NAMES) and request.macs == 4 * 64 * 40
        _, data = request_frame(group=GROUP_NAMES, weight_slice=cols, transpose=True, input_shape=(4, 40), output_shape=(4, 64))
        assert accept(data).message.group == GROUP_NAMES

    @pytest.mark.parametrize(
        "group, cols, error",
        [
            pytest.param(GROUP_NAMES[:1], Range(0, 64), UnknownModel, id="a subset not held as such"),
            pytest.param(("model.layers.0.mlp.up_proj", *GROUP_NAMES), Range(0, 8), UnknownModel, id="a layer not held"),
            pytest.param(GROUP_NAMES, Range(60, 81), ShapeMismatch, id="past the last member"),
        ],
    )
    def test_a_group_the_provider_cannot_serve(self, group: tuple[str, ...], cols: Range, error: type) -> None:
        _, data = request_frame(group=group, weight_slice=WeightSlice(rows=Range(0, 64), cols=cols),
                                input_shape=(4, 64), output_shape=(4, len(cols)))
        with pytest.raises(error):
            accept(data)

    def test_offer_below_the_asked_price(self) -> None:
        _, data = request_frame(price_per_gmac=999)
        frame = decode_frame(data, limits=LIMITS)
        with pytest.raises(PaymentRequired) as caught:
            verify_request(frame, peer=CLIENT, window=ReplayWindow(), lookup=lookup, now_ms=NOW_MS, min_price_per_gmac=1000)
        assert (caught.value.asked, caught.value.offered) == (1000, 999)

    def test_provider_cannot_charge_more_than_offered(self) -> None:
        _, data = request_frame(price_per_gmac=10)
        with pytest.raises(ValueError, match="offer"):
            ok_reply(accept(data), b"", key=PROVIDER_KEY, price_per_gmac=11, compute_time_us=0, now_ms=NOW_MS)


def forged_reply(sealed: Sealed[MatmulRequest], *, key: Any = PROVIDER_KEY, **receipt_changes: Any) -> bytes:
    """A reply whose receipt, signed by `key`, differs from the honest one by `receipt_changes`."""
    provider = receipt_changes.pop("provider", PROVIDER)
    receipt = UsageReceipt(
        provider=provider,
        client=CLIENT,
        request_id=sealed.message.request_id,
        request_digest=sealed.digest,
        reply_digest=sha256(REPLY_PAYLOAD),
        macs=sealed.message.macs,
        price_per_gmac=sealed.message.price_per_gmac,
        completed_at_ms=NOW_MS,
    )
    receipt = dataclasses.replace(receipt, **receipt_changes)
    reply = MatmulReply(
        request_id=sealed.message.request_id,
        request_digest=sealed.digest,
        payload_sha256=sha256(REPLY_PAYLOAD),
        payload_length=len(REPLY_PAYLOAD),
        receipt=sign_receipt(receipt, key),
    )
    return encode_frame(seal(reply, key), REPLY_PAYLOAD)


class TestClientChecks:
    def test_honest_forgery_baseline_passes(self) -> None:
        sealed, _ = request_frame()
        assert client_reads(forged_reply(sealed), sealed).ok

    @pytest.mark.parametrize(
        "change",
        [
            pytest.param({"macs": 4 * 16 * 32 + 1}, id="more MACs than ordered"),
            pytest.param({"price_per_gmac": 1001}, id="price above the offer"),
            pytest.param({"client": OTHER}, id="another client"),
            pytest.param({"request_id": b"\x00" * 16}, id="another request id"),
            pytest.param({"request_digest": b"\x00" * 32}, id="another request digest"),
            pytest.param({"reply_digest": b"\x00" * 32}, id="another payload"),
        ],
    )
    def test_receipt_that_does_not_match_is_refused(self, change: dict[str, Any]) -> None:
        sealed, _ = request_frame()
        with pytest.raises(BadSignature):
            client_reads(forged_reply(sealed, **change), sealed)

    def test_reply_from_another_provider_is_refused(self) -> None:
        sealed, _ = request_frame()
        with pytest.raises(BadSignature):
            client_reads(forged_reply(sealed, key=OTHER_KEY, provider=OTHER), sealed)

    def test_reply_to_another_request_is_refused(self) -> None:
        sealed, _ = request_frame()
        other, _ = request_frame()
        with pytest.raises(BadSignature):
            client_reads(reply_frame(sealed), other)


PROVIDER_ERRORS = [
    MalformedFrame("header does not decode"),
    FrameTooLarge(1 << 16, 1 << 20, what="payload"),
    ExpiredFrame(expires_at_ms=1, now_ms=2),
    UnknownModel(MODEL, "lm_head"),
    ShapeMismatch("input shape does not fit the weight slice", expected=(4, 16), got=(4, 15)),
    UnsupportedParams("ring degree 512 is not served", backend="rlwe"),
    Busy(250),
    DeadlineExceeded("computation", timeout_s=30),
    InternalError("out of GPU memory"),
    PaymentRequired(asked=1000, offered=10),
]


class TestErrorReplies:
    @pytest.mark.parametrize("error", PROVIDER_ERRORS, ids=lambda error: type(error).__name__)
    def test_client_raises_the_providers_typed_error(self, error: Exception) -> None:
        sealed, data = request_frame()
        reply = error_reply(error, decode_frame(data, limits=LIMITS))
        assert (reply.request_id, reply.request_digest) == (sealed.message.request_id, sealed.digest)
        with pytest.raises(type(error)) as caught:
            client_reads(encode_frame(seal(reply, PROVIDER_KEY)), sealed)
        assert caught.value.remote and not getattr(error, "remote")
        for field in ("retry_after_ms", "limit", "asked"):
            assert getattr(caught.value, field, None) == getattr(error, field, None)

    def test_undecodable_request_gets_an_anonymous_error_reply(self) -> None:
        sealed, _ = request_frame()
        reply = error_reply(MalformedFrame("envelope does not decode"))
        assert reply.request_id == reply.request_digest == b""
        with pytest.raises(MalformedFrame, match="envelope does not decode"):
            client_reads(encode_frame(seal(reply, PROVIDER_KEY)), sealed)

    def test_error_naming_another_request_is_refused(self) -> None:
        sealed, _ = request_frame()
        _, other = request_frame()
        reply = error_reply(Busy(10), decode_frame(other, limits=LIMITS))
        with pytest.raises(BadSignature):
            client_reads(encode_frame(seal(reply, PROVIDER_KEY)), sealed)

    def test_bugs_are_not_leaked(self) -> None:
        reply = error_reply(KeyError("/home/provider/secret.key"))
        assert reply.error is not None
        assert (reply.error.code.name, reply.error.message) == ("INTERNAL", "internal error")


class TestReceiptAck:
    def _issued(self) -> Any:
        sealed, _ = request_frame()
        receipt = client_reads(reply_frame(sealed), sealed).receipt
        assert receipt is not None
        return receipt

    def test_ack_of_another_receipt_is_refused(self) -> None:
        issued, other = self._issued(), self._issued()
        ack = encode_frame(seal(countersign_receipt(other, CLIENT_KEY), CLIENT_KEY))
        with pytest.raises(BadSignature):
            verify_receipt_ack(decode_frame(ack, limits=LIMITS), peer=CLIENT, issued=issued)

    def test_ack_without_countersignature_is_refused(self) -> None:
        issued = self._issued()
        with pytest.raises(BadSignature):
            verify_receipt_ack(decode_frame(encode_frame(seal(issued, CLIENT_KEY)), limits=LIMITS), peer=CLIENT, issued=issued)

    def test_ack_from_another_peer_is_refused(self) -> None:
        issued = self._issued()
        ack = encode_frame(seal(countersign_receipt(issued, CLIENT_KEY), OTHER_KEY))
        with pytest.raises(BadSignature):
            verify_receipt_ack(decode_frame(ack, limits=LIMITS), peer=OTHER, issued=issued)


class TestAdvert:
    def test_signed_advert_names_its_provider(self) -> None:
        advert = make_advert()
        verified = verify_advert(seal(advert, PROVIDER_KEY).header, now_ms=NOW_MS)
        assert (verified.message, verified.signer) == (advert, PROVIDER)

    @pytest.mark.parametrize("now_ms", [NOW_MS + 60_000, NOW_MS - 600_000])
    def test_expired_or_too_long_lived_advert_refused(self, now_ms: int) -> None:
        with pytest.raises(ExpiredFrame):
            verify_advert(seal(make_advert(), PROVIDER_KEY).header, now_ms=now_ms)

    def test_only_adverts(self) -> None:
        sealed, _ = request_frame()
        with pytest.raises(MalformedFrame, match="expected a CapabilityAdvert"):
            verify_advert(sealed.header, now_ms=NOW_MS)

    def test_oversized_advert_refused_unread(self) -> None:
        with pytest.raises(FrameTooLarge):
            verify_advert(b"\x00" * (64 * 1024 + 1), now_ms=NOW_MS)


def test_a_precomputed_payload_digest_is_the_one_checked() -> None:
    """Nodes hash payloads in a worker thread and hand the digest over: every check then uses that
    digest, so a digest of other bytes is refused exactly like a tampered payload."""
    sha = hashlib.sha256
    sealed, data = request_frame(payload_sha256=sha(PAYLOAD).digest())
    assert sealed.message.payload_sha256 == sha(PAYLOAD).digest()
    frame = decode_frame(data, limits=LIMITS)

    def check(digest: bytes) -> Any:
        return verify_request(frame, peer=CLIENT, window=ReplayWindow(), lookup=lookup, now_ms=NOW_MS, payload_sha256=digest)

    with pytest.raises(BadSignature, match="digest"):
        check(sha(PAYLOAD + b"x").digest())
    verified = check(sha(PAYLOAD).digest())
    reply = ok_reply(verified, REPLY_PAYLOAD, key=PROVIDER_KEY, price_per_gmac=800, compute_time_us=1, now_ms=NOW_MS,
                     payload_sha256=sha(REPLY_PAYLOAD).digest())
    reply_data = decode_frame(encode_frame(seal(reply, PROVIDER_KEY), REPLY_PAYLOAD), limits=LIMITS)
    with pytest.raises(BadSignature, match="digest"):
        verify_reply(reply_data, peer=PROVIDER, request=sealed, payload_sha256=sha(b"other").digest())
    assert verify_reply(reply_data, peer=PROVIDER, request=sealed, payload_sha256=sha(REPLY_PAYLOAD).digest()).payload == REPLY_PAYLOAD

