"""Signatures: tampering anywhere is refused, the signer must be the stream's peer, domains are
separated, and every verification failure looks the same to the peer."""

from __future__ import annotations

import pytest
from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_key_pair
from wire_factory import (
    CLIENT,
    CLIENT_KEY,
    LIMITS,
    OTHER_KEY,
    PAYLOAD,
    PROVIDER,
    accept,
    make_request,
    reply_frame,
    request_frame,
)

from cipherswarm.protocol import (
    BadSignature,
    ProtocolError,
    countersign_receipt,
    decode_frame,
    encode_frame,
    error_reply,
    seal,
    verify_receipt_ack,
    verify_reply,
)
from cipherswarm.protocol import cipherswarm_matmul_v1_pb2 as pb
from cipherswarm.protocol.signing import (
    HEADER_DOMAIN,
    RECEIPT_CLIENT_DOMAIN,
    RECEIPT_PROVIDER_DOMAIN,
    sign,
    signature_input,
    verify,
)
from cipherswarm.protocol.varint import encode_uvarint

MASKS = (0x01, 0x80, 0xFF)


def flipped(data: bytes):  # type: ignore[no-untyped-def]
    for index in range(len(data)):
        for mask in MASKS:
            yield index, data[:index] + bytes([data[index] ^ mask]) + data[index + 1 :]


def reframe(header: pb.Envelope, payload: bytes = PAYLOAD) -> bytes:
    data = header.SerializeToString()
    return encode_uvarint(len(data)) + data + payload


class TestSignatureInput:
    def test_known_answer(self) -> None:
        assert signature_input(b"abc", b"xyz").hex() == "03616263" + "0378797a"

    def test_length_prefixes_keep_domain_and_data_apart(self) -> None:
        assert signature_input(b"ab", b"cxyz") != signature_input(b"abc", b"xyz")

    @pytest.mark.parametrize(
        ("signed_under", "checked_under"),
        [
            (HEADER_DOMAIN, RECEIPT_PROVIDER_DOMAIN),
            (RECEIPT_PROVIDER_DOMAIN, RECEIPT_CLIENT_DOMAIN),
            (RECEIPT_CLIENT_DOMAIN, HEADER_DOMAIN),
        ],
    )
    def test_domains_are_separated(self, signed_under: bytes, checked_under: bytes) -> None:
        signature = sign(CLIENT_KEY, signed_under, b"data")
        verify(CLIENT_KEY.get_public_key(), signed_under, b"data", signature)  # type: ignore[arg-type]
        with pytest.raises(BadSignature):
            verify(CLIENT_KEY.get_public_key(), checked_under, b"data", signature)  # type: ignore[arg-type]

    def test_only_ed25519_keys_sign(self) -> None:
        with pytest.raises(TypeError, match="Ed25519"):
            seal(make_request(), secp256k1_key_pair().private_key)  # type: ignore[arg-type]


class TestTampering:
    def test_every_flipped_byte_of_a_request_is_refused(self) -> None:
        _, data = request_frame()
        accept(data)  # the untouched frame passes
        for index, tampered in flipped(data):
            with pytest.raises(ProtocolError):
                accept(tampered)  # a fresh replay window each time: no refusal is a replay's
                pytest.fail(f"flipped byte {index} was accepted")

    def test_every_flipped_byte_of_a_reply_is_refused(self) -> None:
        sealed, _ = request_frame()
        data = reply_frame(sealed)
        verify_reply(decode_frame(data, limits=LIMITS), peer=PROVIDER, request=sealed)
        for index, tampered in flipped(data):
            with pytest.raises(ProtocolError):
                verify_reply(decode_frame(tampered, limits=LIMITS), peer=PROVIDER, request=sealed)
                pytest.fail(f"flipped byte {index} was accepted")

    def test_every_flipped_byte_of_a_receipt_ack_is_refused(self) -> None:
        sealed, _ = request_frame()
        reply = verify_reply(decode_frame(reply_frame(sealed), limits=LIMITS), peer=PROVIDER, request=sealed)
        issued = reply.message.receipt
        assert issued is not None
        data = encode_frame(seal(countersign_receipt(issued, CLIENT_KEY), CLIENT_KEY))
        verify_receipt_ack(decode_frame(data, limits=LIMITS), peer=CLIENT, issued=issued)
        for index, tampered in flipped(data):
            with pytest.raises(ProtocolError):
                verify_receipt_ack(decode_frame(tampered, limits=LIMITS), peer=CLIENT, issued=issued)
                pytest.fail(f"flipped byte {index} was accepted")


class TestSignerBinding:
    def test_frame_validly_signed_by_another_peer_is_refused(self) -> None:
        _, data = request_frame(key=OTHER_KEY)  # OTHER's valid signature, arriving on CLIENT's stream
        with pytest.raises(BadSignature):
            accept(data)

    def test_key_swapped_for_the_peers_own_is_refused(self) -> None:
        sealed, _ = request_frame(key=OTHER_KEY)
        envelope = pb.Envelope.FromString(sealed.header)
        envelope.public_key = CLIENT_KEY.get_public_key().serialize()
        with pytest.raises(BadSignature):
            accept(reframe(envelope))

    def test_non_ed25519_key_is_refused(self) -> None:
        sealed, _ = request_frame()
        envelope = pb.Envelope.FromString(sealed.header)
        envelope.public_key = secp256k1_key_pair().public_key.serialize()
        with pytest.raises(BadSignature):
            accept(reframe(envelope))

    @pytest.mark.parametrize("length", [0, 63, 65])
    def test_signature_of_wrong_length_is_refused(self, length: int) -> None:
        sealed, _ = request_frame()
        envelope = pb.Envelope.FromString(sealed.header)
        envelope.signature = envelope.signature.ljust(length, b"\x00")[:length]
        with pytest.raises(BadSignature):
            accept(reframe(envelope))


class TestNoOracle:
    def test_every_verification_failure_gets_the_same_reply(self) -> None:
        sealed, data = request_frame()
        envelope = pb.Envelope.FromString(sealed.header)
        bad_signature = pb.Envelope(public_key=envelope.public_key, body=envelope.body, signature=b"\x00" * 64)
        failures = [
            request_frame(key=OTHER_KEY)[1],  # signer is not the peer
            reframe(bad_signature),  # signature does not verify
            data[:-1] + bytes([data[-1] ^ 1]),  # payload does not match its digest
        ]
        replies = set()
        for failure in failures:
            frame = decode_frame(failure, limits=LIMITS)
            with pytest.raises(BadSignature) as caught:
                accept(failure)
            replies.add(error_reply(caught.value, frame).error)
        assert len(replies) == 1
        (reply,) = replies
        assert (reply.code.name, reply.message) == ("BAD_SIGNATURE", "verification failed")
