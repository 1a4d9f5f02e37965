"""The specification's test vector and constants, checked against the code that implements them."""

from __future__ import annotations

import pathlib
import re

from libp2p.peer.id import ID
from wire_factory import CLIENT, CLIENT_KEY, LIMITS, PROVIDER, PROVIDER_KEY

from cipherswarm.protocol import (
    ADVERT_PROTOCOL_ID,
    PROTOCOL_ID,
    Frame,
    MatmulRequest,
    Range,
    Verified,
    WeightSlice,
    decode_frame,
    encode_frame,
    frame_head,
    reply_trailer,
    seal,
    streamed_reply,
    verify_reply,
)
from cipherswarm.protocol.messages import sha256
from cipherswarm.protocol.signing import HEADER_DOMAIN, RECEIPT_CLIENT_DOMAIN, RECEIPT_PROVIDER_DOMAIN

README = (pathlib.Path(__file__).resolve().parents[2] / "protocol" / "README.md").read_text()
PAYLOAD = bytes([1, 2, 3, 4])
VECTOR_REQUEST = MatmulRequest(
    request_id=bytes(range(16)),
    nonce=bytes(range(16, 32)),
    expires_at_ms=1_700_000_030_000,
    model_hash=b"\xaa" * 32,
    layer="l0",
    weight_slice=WeightSlice(rows=Range(0, 2), cols=Range(0, 2)),
    transpose=False,
    backend="clear",
    backend_params=b"",
    mask_seeds=(),
    input_shape=(1, 2),
    output_shape=(1, 2),
    payload_sha256=sha256(PAYLOAD),
    payload_length=len(PAYLOAD),
    price_per_gmac=1000,
)


def readme_vectors() -> list[bytes]:
    """The README's hex blocks, in order: the request frame, a streamed reply's two frames, then section 12's."""
    return [bytes.fromhex(block) for block in re.findall(r"```hex\n(.*?)```", README, re.DOTALL)]


def readme_vector() -> bytes:
    return readme_vectors()[0]


REPLY_PAYLOAD = bytes([5, 6, 7, 8])


def test_readme_streamed_reply_is_what_the_code_sends_and_a_client_accepts() -> None:
    assert PROVIDER_KEY.private_bytes_raw() == bytes(range(33, 65))  # the vector's seed
    sealed = seal(VECTOR_REQUEST, CLIENT_KEY)
    request = Verified(VECTOR_REQUEST, CLIENT, sealed.digest, PAYLOAD)
    head = seal(streamed_reply(request, len(REPLY_PAYLOAD)), PROVIDER_KEY)
    trailer = seal(reply_trailer(request, sha256(REPLY_PAYLOAD), key=PROVIDER_KEY, price_per_gmac=1000,
                                 compute_time_us=1500, now_ms=1_700_000_001_000), PROVIDER_KEY)
    head_vector, trailer_vector = readme_vectors()[1:3]
    assert frame_head(head) + REPLY_PAYLOAD == head_vector and encode_frame(trailer) == trailer_vector
    frame = decode_frame(head_vector, limits=LIMITS)
    frame = Frame(frame.header, frame.payload, trailer=decode_frame(trailer_vector, limits=LIMITS).header)
    reply = verify_reply(frame, peer=PROVIDER, request=sealed)
    assert reply.payload == REPLY_PAYLOAD and reply.message.receipt is not None
    assert reply.message.receipt.receipt.amount == 1  # ceil(4 MACs x 1000 / 10^9)
    assert ID(PROVIDER).to_base58() in README and PROVIDER_KEY.public_key().public_bytes_raw().hex() in README


def test_readme_vector_is_what_the_code_sends() -> None:
    assert CLIENT_KEY.private_bytes_raw() == bytes(range(1, 33))  # the vector's seed
    sealed = seal(VECTOR_REQUEST, CLIENT_KEY)
    assert encode_frame(sealed, PAYLOAD) == readme_vector()
    assert sealed.digest.hex() in README


def test_readme_vector_is_accepted() -> None:
    frame = decode_frame(readme_vector(), limits=LIMITS)
    assert frame.header.verify(CLIENT) == CLIENT
    assert (frame.header.message, frame.payload) == (VECTOR_REQUEST, PAYLOAD)
    assert ID(CLIENT).to_base58() in README


def test_readme_names_the_ids_and_domains_in_use() -> None:
    for constant in (PROTOCOL_ID, ADVERT_PROTOCOL_ID, HEADER_DOMAIN.decode(), RECEIPT_PROVIDER_DOMAIN.decode(), RECEIPT_CLIENT_DOMAIN.decode()):
        assert f"`{constant}`" in README
