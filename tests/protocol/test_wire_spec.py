"""The specification's test vector and constants, checked against the code that implements them."""

from __future__ import annotations

import pathlib
import re

from libp2p.peer.id import ID
from wire_factory import CLIENT, CLIENT_KEY, LIMITS

from cipherswarm.protocol import ADVERT_PROTOCOL_ID, PROTOCOL_ID, MatmulRequest, Range, WeightSlice, decode_frame, encode_frame, seal
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


def readme_vector() -> bytes:
    block = re.search(r"```hex\n(.*?)```", README, re.DOTALL)
    assert block is not None
    return bytes.fromhex(block.group(1))


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
