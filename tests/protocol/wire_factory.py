"""Keys, a layer table and message builders shared by the protocol tests.

Keys are real Ed25519 keys from fixed seeds, so a failing hypothesis example replays identically.
"""

from __future__ import annotations

from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherswarm.protocol import (
    CapabilityAdvert,
    LayerShape,
    Limits,
    MatmulRequest,
    Range,
    Sealed,
    Verified,
    WeightSlice,
    decode_frame,
    encode_frame,
    ok_reply,
    seal,
    verify_request,
)
from cipherswarm.protocol.messages import sha256
from cipherswarm.protocol.replay import ReplayWindow
from cipherswarm.protocol.signing import peer_id

NOW_MS = 1_700_000_000_000
CLIENT_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(1, 33)))
PROVIDER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(33, 65)))
OTHER_KEY = Ed25519PrivateKey.from_private_bytes(bytes(range(65, 97)))
CLIENT = peer_id(CLIENT_KEY.public_key())
PROVIDER = peer_id(PROVIDER_KEY.public_key())
OTHER = peer_id(OTHER_KEY.public_key())

MODEL = sha256(b"tiny model weights")
LAYER_NAME = "model.layers.0.self_attn.q_proj"
LAYER = LayerShape(64, 48)
LIMITS = Limits(max_payload_size=1 << 16)
PAYLOAD = bytes(range(32))
REPLY_PAYLOAD = bytes(range(100, 140))


GROUP_NAMES = ("model.layers.0.self_attn.k_proj", "model.layers.0.self_attn.v_proj")  # 1.1: q|k|v, each 64 x 16
GROUP = LayerShape(64, 48 + 2 * 16)


def lookup(model_hash: bytes, layers: tuple[str, ...]) -> LayerShape | None:
    if model_hash != MODEL:
        return None
    return {(LAYER_NAME,): LAYER, (LAYER_NAME, *GROUP_NAMES): GROUP}.get(layers)


def make_request(payload: bytes = PAYLOAD, **overrides: Any) -> MatmulRequest:
    fields: dict[str, Any] = dict(
        expires_at_ms=NOW_MS + 30_000,
        model_hash=MODEL,
        layer=LAYER_NAME,
        weight_slice=WeightSlice(rows=Range(0, 16), cols=Range(8, 40)),
        transpose=False,
        backend="rlwe",
        backend_params=b"\x01params",
        input_shape=(4, 16),
        output_shape=(4, 32),
        price_per_gmac=1_000,
    )
    fields.update(overrides)
    return MatmulRequest.for_payload(payload, **fields)


def make_advert(**overrides: Any) -> CapabilityAdvert:
    fields: dict[str, Any] = dict(
        protocols=("/cipherswarm/matmul/1.0.0",),
        addrs=(b"\x04\x7f\x00\x00\x01\x06\x10\x01",),
        models=(MODEL,),
        backends=("rlwe", "clear"),
        device="cpu",
        macs_per_second=8_000_000_000,
        price_per_gmac=500,
        free_slots=4,
        max_payload_size=1 << 26,
        issued_at_ms=NOW_MS,
        expires_at_ms=NOW_MS + 60_000,
    )
    fields.update(overrides)
    return CapabilityAdvert(**fields)


def request_frame(payload: bytes = PAYLOAD, key: Ed25519PrivateKey = CLIENT_KEY, **overrides: Any) -> tuple[Sealed[MatmulRequest], bytes]:
    sealed = seal(make_request(payload, **overrides), key)
    return sealed, encode_frame(sealed, payload)


def accept(data: bytes, *, window: ReplayWindow | None = None, now_ms: int = NOW_MS) -> Verified[MatmulRequest]:
    """What a provider does with the bytes of a request frame from CLIENT."""
    return verify_request(
        decode_frame(data, limits=LIMITS),
        peer=CLIENT,
        window=window if window is not None else ReplayWindow(),
        lookup=lookup,
        now_ms=now_ms,
    )


def reply_frame(sealed_request: Sealed[MatmulRequest], payload: bytes = REPLY_PAYLOAD) -> bytes:
    """The provider's successful reply frame to a request from CLIENT."""
    verified = accept(encode_frame(sealed_request, PAYLOAD))
    reply = ok_reply(verified, payload, key=PROVIDER_KEY, price_per_gmac=800, compute_time_us=1234, now_ms=NOW_MS)
    return encode_frame(seal(reply, PROVIDER_KEY), payload)
