"""Signatures: tampering anywhere is refused, the signer must be the stream's peer, domains are
separated, and every verification failure looks the same to the peer."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from libp2p.crypto.ed25519 import create_new_key_pair as libp2p_ed25519_key_pair
from libp2p.crypto.secp256k1 import create_new_key_pair as secp256k1_key_pair
from libp2p.peer.id import ID
from nacl.bindings import crypto_core_ed25519_is_valid_point
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
    decode_public_key,
    encode_public_key,
    peer_id,
    peer_key,
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
        verify(CLIENT_KEY.public_key(), signed_under, b"data", signature)
        with pytest.raises(BadSignature):
            verify(CLIENT_KEY.public_key(), checked_under, b"data", signature)

    def test_only_ed25519_keys_sign(self) -> None:
        with pytest.raises(TypeError, match="Ed25519"):
            seal(make_request(), secp256k1_key_pair().private_key)  # type: ignore[arg-type]


# Every point of small order (1, 2, 4 or 8) and the non-canonical encodings of 0 and 1 (y = p, p + 1),
# little-endian y with the sign bit clear: libsodium's list (crypto_core/ed25519/ref10).
P = 2**255 - 19
SMALL_ORDER = [y.to_bytes(32, "little") for y in (0, 1, P - 1, P, P + 1)] + [
    bytes.fromhex("26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05"),
    bytes.fromhex("c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a"),
]


class TestIdentity:
    """Keys and peer ids are derived here without libp2p, so libp2p itself is the reference."""

    @pytest.mark.parametrize("seed", [bytes(range(1, 33)), bytes(32), b"\xff" * 32, bytes(range(7, 39))])
    def test_peer_id_and_key_bytes_are_libp2ps(self, seed: bytes) -> None:
        ours = Ed25519PrivateKey.from_private_bytes(seed).public_key()
        theirs = libp2p_ed25519_key_pair(seed).public_key
        assert encode_public_key(ours) == theirs.serialize()
        assert peer_id(ours) == ID.from_pubkey(theirs).to_bytes()
        assert ID(peer_id(ours)).to_base58().startswith("12D3KooW")
        assert peer_key(peer_id(ours)) == ours

    def test_signatures_are_libp2ps(self) -> None:
        """Ed25519 is deterministic: the same seed signs the same bytes identically in both."""
        theirs = libp2p_ed25519_key_pair(bytes(range(1, 33))).private_key
        assert sign(CLIENT_KEY, HEADER_DOMAIN, b"data") == theirs.sign(signature_input(HEADER_DOMAIN, b"data"))

    def test_peer_ids_of_other_key_types_name_no_key(self) -> None:
        secp256k1 = ID.from_pubkey(secp256k1_key_pair().public_key).to_bytes()
        for peer in (secp256k1, peer_id(CLIENT_KEY.public_key())[:-1], b"\x12\x20" + bytes(32)):
            with pytest.raises(BadSignature):
                peer_key(peer)

    @pytest.mark.parametrize("point", SMALL_ORDER)
    @pytest.mark.parametrize("sign_bit", [0, 0x80])
    def test_keys_of_small_order_are_refused_as_libsodium_refuses_them(self, point: bytes, sign_bit: int) -> None:
        key = point[:31] + bytes([point[31] | sign_bit])
        assert not crypto_core_ed25519_is_valid_point(key)  # the reference refuses them too
        with pytest.raises(BadSignature):
            decode_public_key(bytes([0x08, 0x01, 0x12, 0x20]) + key)

    def test_non_canonical_key_is_refused(self) -> None:
        with pytest.raises(BadSignature):
            decode_public_key(bytes([0x08, 0x01, 0x12, 0x20]) + (P + 2).to_bytes(32, "little"))

    def test_forgery_under_a_small_order_key_is_refused(self) -> None:
        """R = A = the neutral point and S = 0 verify for every message under OpenSSL's cofactorless
        check alone; verify refuses such an R even for a key that bypassed decode_public_key."""
        neutral = SMALL_ORDER[1]
        forged = neutral + bytes(32)
        key = Ed25519PublicKey.from_public_bytes(neutral)
        key.verify(forged, signature_input(HEADER_DOMAIN, b"any message"))  # what the check guards against
        with pytest.raises(BadSignature):
            verify(key, HEADER_DOMAIN, b"any message", forged)

    def test_non_canonical_s_is_refused(self) -> None:
        good = sign(CLIENT_KEY, HEADER_DOMAIN, b"data")
        order = 2**252 + 27742317777372353535851937790883648493
        s = int.from_bytes(good[32:], "little") + order  # the same point equation, S not reduced
        with pytest.raises(BadSignature):
            verify(CLIENT_KEY.public_key(), HEADER_DOMAIN, b"data", good[:32] + s.to_bytes(32, "little"))


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
        envelope.public_key = encode_public_key(CLIENT_KEY.public_key())
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
