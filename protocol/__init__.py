"""cipherswarm wire layer: schemas, framing, signatures, freshness, limits and typed errors.

README.md beside this file is the wire specification. This package is a synchronous, sans-I/O core:
bytes in, records or typed errors out, the clock passed in. It imports neither trio, libp2p nor
torch (tests/test_layering.py checks): keys are `cryptography` Ed25519 keys and peer ids their libp2p
multihash bytes, converted at the node's boundary (node/identity.py), and frames are read from and
written to streams by the node (node/streams.py).
"""

from .envelope import Header, Sealed, decode_header, seal
from .errors import (
    BadSignature,
    Busy,
    ContractionTooThin,
    DeadlineExceeded,
    ErrorCode,
    ExpiredFrame,
    FrameTooLarge,
    PayloadTooLarge,
    InternalError,
    MalformedFrame,
    PaymentRequired,
    ProtocolError,
    ReplayedFrame,
    ReplyTooLarge,
    ShapeMismatch,
    TruncatedFrame,
    UnknownModel,
    UnsupportedParams,
    WireError,
)
from .exchange import (
    LayerLookup,
    Verified,
    error_reply,
    ok_reply,
    reply_trailer,
    streamed_reply,
    verify_advert,
    verify_receipt_ack,
    verify_reply,
    verify_request,
)
from .framing import DEFAULT_MAX_PAYLOAD_SIZE, MAX_HEADER_SIZE, Frame, FrameParser, Limits, decode_frame, encode_frame, frame_head, frame_prefix, read_frame_sync
from .messages import (
    CapabilityAdvert,
    MatmulReply,
    MatmulRequest,
    Message,
    Range,
    ReplyTrailer,
    SignedReceipt,
    UsageReceipt,
    WeightSlice,
    sha256,
)
from .receipts import countersign_receipt, sign_receipt, verify_countersignature, verify_receipt
from .replay import DEFAULT_MAX_TTL_MS, ReplayWindow
from .shapes import LayerShape, check_shapes

PROTOCOL_ID = "/cipherswarm/matmul/1.2.0"
"""The newest stream protocol id this version speaks (README, "Versioning")."""
STREAM_PROTOCOL_ID = PROTOCOL_ID
"""The first version whose replies may be streamed (`MatmulReply.streamed`, `ReplyTrailer`)."""
GROUP_PROTOCOL_ID = "/cipherswarm/matmul/1.1.0"
"""The first version whose requests may concatenate layers (`MatmulRequest.group`)."""
PROTOCOL_IDS: tuple[str, ...] = (PROTOCOL_ID, GROUP_PROTOCOL_ID, "/cipherswarm/matmul/1.0.0")
"""Every id served and proposed, newest first: register a handler for each, and pass them all to
`new_stream`, so multistream-select settles on the newest version both peers speak."""
ADVERT_PROTOCOL_ID = "/cipherswarm/advert/1.0.0"
"""The stream protocol on which a provider hands out its current advert (README, "Adverts")."""

__all__ = [
    "DEFAULT_MAX_PAYLOAD_SIZE",
    "DEFAULT_MAX_TTL_MS",
    "ADVERT_PROTOCOL_ID",
    "GROUP_PROTOCOL_ID",
    "MAX_HEADER_SIZE",
    "PROTOCOL_ID",
    "PROTOCOL_IDS",
    "STREAM_PROTOCOL_ID",
    "BadSignature",
    "Busy",
    "CapabilityAdvert",
    "ContractionTooThin",
    "DeadlineExceeded",
    "ErrorCode",
    "ExpiredFrame",
    "Frame",
    "FrameParser",
    "FrameTooLarge",
    "PayloadTooLarge",
    "Header",
    "InternalError",
    "LayerLookup",
    "LayerShape",
    "Limits",
    "MalformedFrame",
    "MatmulReply",
    "MatmulRequest",
    "Message",
    "PaymentRequired",
    "ProtocolError",
    "Range",
    "ReplayWindow",
    "ReplayedFrame",
    "ReplyTrailer",
    "ReplyTooLarge",
    "Sealed",
    "ShapeMismatch",
    "SignedReceipt",
    "TruncatedFrame",
    "UnknownModel",
    "UnsupportedParams",
    "UsageReceipt",
    "Verified",
    "WeightSlice",
    "WireError",
    "check_shapes",
    "countersign_receipt",
    "decode_frame",
    "decode_header",
    "encode_frame",
    "error_reply",
    "frame_head",
    "frame_prefix",
    "ok_reply",
    "read_frame_sync",
    "reply_trailer",
    "seal",
    "sha256",
    "sign_receipt",
    "streamed_reply",
    "verify_advert",
    "verify_countersignature",
    "verify_receipt",
    "verify_receipt_ack",
    "verify_reply",
    "verify_request",
]
