"""Typed, validated records for the messages of cipherswarm_matmul_v1.proto.

The rest of the code never touches generated protobuf classes: it builds these frozen dataclasses,
whose constructors refuse values the specification forbids (TypeError for a wrong type, ValueError
for a wrong value), and `decode_body` turns every decoding or validation failure of a peer's bytes
into one MalformedFrame. Bounds that the protocol fixes (id and digest sizes, name lengths, MAX_DIM)
live here; bounds a receiver chooses (frame sizes, lifetimes) live with the receiver.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from functools import cached_property
from typing import TypeAlias

from google.protobuf.message import DecodeError

from . import cipherswarm_matmul_v1_pb2 as pb
from .errors import MAX_ERROR_MESSAGE, ErrorCode, MalformedFrame, WireError
from .signing import SIGNATURE_SIZE

ID_SIZE = 16
"""Bytes of a request id and of a nonce: random, so collisions stay below 2**-64 for 2**32 requests."""
DIGEST_SIZE = 32
SEED_SIZE = 32
MAX_LAYER_NAME = 256
MAX_GROUP = 15
"""Further layers one request may concatenate (`MatmulRequest.group`, 1.1): at most 16 in all."""
MAX_BACKEND_NAME = 32
MAX_DIM = 2**21
"""Largest matrix dimension. Keeps m * k * n below 2**63, so MAC counts fit any uint64."""
MAX_PEER_ID = 64
MAX_ADVERT_LAYERS = 1024
"""Layer digests an advert may list: 32 KiB of them keeps a sealed advert well inside MAX_HEADER_SIZE.
A provider holding more than that many layers holds whole models and lists none."""
MAX_UINT64 = 2**64 - 1
MAX_UINT32 = 2**32 - 1


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _check_type(name: str, value: object, kind: type) -> None:
    # bool is an int subclass; a True where a count belongs is a caller's bug, not a 1.
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise TypeError(f"{name} must be {kind.__name__}, got {type(value).__name__}")


def _check_uint(name: str, value: int, maximum: int = MAX_UINT64) -> None:
    _check_type(name, value, int)
    if not 0 <= value <= maximum:
        raise ValueError(f"{name} must be in [0, {maximum}], got {value}")


def _check_bytes(name: str, value: bytes, *, size: int | None = None, max_size: int | None = None) -> None:
    _check_type(name, value, bytes)
    if size is not None and len(value) != size:
        raise ValueError(f"{name} must be {size} bytes, got {len(value)}")
    if max_size is not None and not 1 <= len(value) <= max_size:
        raise ValueError(f"{name} must be 1 to {max_size} bytes, got {len(value)}")


def _check_text(name: str, value: str, max_bytes: int) -> None:
    _check_type(name, value, str)
    if not 1 <= len(value.encode()) <= max_bytes:
        raise ValueError(f"{name} must be 1 to {max_bytes} bytes of UTF-8")


def _check_items(name: str, values: tuple[object, ...], max_items: int) -> None:
    _check_type(name, values, tuple)
    if len(values) > max_items:
        raise ValueError(f"{name} must have at most {max_items} entries, got {len(values)}")


def _check_shape(name: str, shape: tuple[int, ...]) -> None:
    _check_type(name, shape, tuple)
    if len(shape) != 2:
        raise ValueError(f"{name} must have rank 2, got rank {len(shape)}")
    for dim in shape:
        _check_uint(name, dim, MAX_DIM)
        if dim == 0:
            raise ValueError(f"{name} must have no zero dimension")


@dataclass(frozen=True, slots=True)
class Range:
    """Half-open interval [start, stop) of weight rows or columns; never empty."""

    start: int
    stop: int

    def __post_init__(self) -> None:
        _check_uint("range start", self.start, MAX_DIM)
        _check_uint("range stop", self.stop, MAX_DIM)
        if self.start >= self.stop:
            raise ValueError(f"range must be non-empty, got [{self.start}, {self.stop})")

    def __len__(self) -> int:
        return self.stop - self.start

    def to_proto(self) -> pb.Range:
        return pb.Range(start=self.start, stop=self.stop)

    @classmethod
    def from_proto(cls, msg: pb.Range) -> Range:
        return cls(msg.start, msg.stop)


@dataclass(frozen=True, kw_only=True, slots=True)
class WeightSlice:
    """W[rows, cols] of a layer's weight W (d_in x d_out, y = x @ W)."""

    rows: Range
    cols: Range

    def __post_init__(self) -> None:
        _check_type("rows", self.rows, Range)
        _check_type("cols", self.cols, Range)

    def to_proto(self) -> pb.WeightSlice:
        return pb.WeightSlice(rows=self.rows.to_proto(), cols=self.cols.to_proto())

    @classmethod
    def from_proto(cls, msg: pb.WeightSlice) -> WeightSlice:
        return cls(rows=Range.from_proto(msg.rows), cols=Range.from_proto(msg.cols))


@dataclass(frozen=True, kw_only=True, slots=True)
class MatmulRequest:
    """One encrypted product x @ W[rows, cols] (or with the slice transposed) asked of a provider."""

    request_id: bytes  # ID_SIZE random bytes, echoed in the reply and the receipt
    nonce: bytes  # ID_SIZE bytes from os.urandom, accepted once by the provider
    expires_at_ms: int  # Unix time in ms after which the provider refuses the request
    model_hash: bytes  # DIGEST_SIZE-byte content hash of the model
    layer: str  # layer name within the model
    weight_slice: WeightSlice
    transpose: bool  # multiply by the slice's transpose (backward pass)
    backend: str  # encryption engine name
    backend_params: bytes  # the engine's parameters, opaque here
    mask_seeds: tuple[bytes, ...]  # SEED_SIZE bytes each; empty when the payload carries its seeds
    input_shape: tuple[int, int]  # plaintext operand [m, k]
    output_shape: tuple[int, int]  # plaintext result [m, n]
    payload_sha256: bytes
    payload_length: int
    price_per_gmac: int  # most the client pays per 10^9 multiply-accumulates
    group: tuple[str, ...] = ()  # 1.1: further layers; W is the column concatenation [W_layer | W_group...]

    def __post_init__(self) -> None:
        _check_bytes("request_id", self.request_id, size=ID_SIZE)
        _check_bytes("nonce", self.nonce, size=ID_SIZE)
        _check_uint("expires_at_ms", self.expires_at_ms)
        _check_bytes("model_hash", self.model_hash, size=DIGEST_SIZE)
        _check_text("layer", self.layer, MAX_LAYER_NAME)
        _check_type("weight_slice", self.weight_slice, WeightSlice)
        _check_type("transpose", self.transpose, bool)
        _check_text("backend", self.backend, MAX_BACKEND_NAME)
        _check_type("backend_params", self.backend_params, bytes)
        _check_type("mask_seeds", self.mask_seeds, tuple)
        for seed in self.mask_seeds:
            _check_bytes("mask seed", seed, size=SEED_SIZE)
        _check_shape("input_shape", self.input_shape)
        _check_shape("output_shape", self.output_shape)
        _check_bytes("payload_sha256", self.payload_sha256, size=DIGEST_SIZE)
        _check_uint("payload_length", self.payload_length)
        _check_uint("price_per_gmac", self.price_per_gmac)
        _check_type("group", self.group, tuple)
        _check_items("group", self.group, MAX_GROUP)
        for name in self.group:
            _check_text("group layer", name, MAX_LAYER_NAME)

    @property
    def layers(self) -> tuple[str, ...]:
        """The layers whose column concatenation W is, in order: `layer`, then `group`."""
        return (self.layer, *self.group)

    @classmethod
    def for_payload(
        cls,
        payload: bytes,
        *,
        expires_at_ms: int,
        model_hash: bytes,
        layer: str,
        weight_slice: WeightSlice,
        transpose: bool,
        backend: str,
        backend_params: bytes,
        input_shape: tuple[int, int],
        output_shape: tuple[int, int],
        price_per_gmac: int,
        mask_seeds: tuple[bytes, ...] = (),
        payload_sha256: bytes | None = None,
        group: tuple[str, ...] = (),
    ) -> MatmulRequest:
        """A request for `payload` with a fresh random id and nonce and the payload's digest.

        Pass `payload_sha256` when it is already known: hashing a layer-sized payload takes tens of
        milliseconds, which a node spends once, in a worker thread, not on its event loop per attempt.
        """
        _check_type("payload", payload, bytes)
        return cls(
            request_id=os.urandom(ID_SIZE),
            nonce=os.urandom(ID_SIZE),
            expires_at_ms=expires_at_ms,
            model_hash=model_hash,
            layer=layer,
            weight_slice=weight_slice,
            transpose=transpose,
            backend=backend,
            backend_params=backend_params,
            mask_seeds=mask_seeds,
            input_shape=input_shape,
            output_shape=output_shape,
            payload_sha256=sha256(payload) if payload_sha256 is None else payload_sha256,
            payload_length=len(payload),
            price_per_gmac=price_per_gmac,
            group=group,
        )

    @property
    def macs(self) -> int:
        """Multiply-accumulates of the plaintext product, m * k * n: what a receipt charges for."""
        (m, k), n = self.input_shape, self.output_shape[1]
        return m * k * n

    def to_proto(self) -> pb.MatmulRequest:
        return pb.MatmulRequest(
            request_id=self.request_id,
            nonce=self.nonce,
            expires_at_ms=self.expires_at_ms,
            model_hash=self.model_hash,
            layer=self.layer,
            weight_slice=self.weight_slice.to_proto(),
            transpose=self.transpose,
            backend=self.backend,
            backend_params=self.backend_params,
            mask_seeds=self.mask_seeds,
            input_shape=self.input_shape,
            output_shape=self.output_shape,
            payload_sha256=self.payload_sha256,
            payload_length=self.payload_length,
            price_per_gmac=self.price_per_gmac,
            group=self.group,
        )

    @classmethod
    def from_proto(cls, msg: pb.MatmulRequest) -> MatmulRequest:
        return cls(
            request_id=msg.request_id,
            nonce=msg.nonce,
            expires_at_ms=msg.expires_at_ms,
            model_hash=msg.model_hash,
            layer=msg.layer,
            weight_slice=WeightSlice.from_proto(msg.weight_slice),
            transpose=msg.transpose,
            backend=msg.backend,
            backend_params=msg.backend_params,
            mask_seeds=tuple(msg.mask_seeds),
            input_shape=tuple(msg.input_shape),  # type: ignore[arg-type]  # rank checked on construction
            output_shape=tuple(msg.output_shape),  # type: ignore[arg-type]
            payload_sha256=msg.payload_sha256,
            payload_length=msg.payload_length,
            price_per_gmac=msg.price_per_gmac,
            group=tuple(msg.group),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class UsageReceipt:
    """What a provider charges for one request (README, "Receipts")."""

    provider: bytes  # peer ids: multihash bytes (signing.peer_id)
    client: bytes
    request_id: bytes
    request_digest: bytes  # SHA-256 of the request's Body bytes
    reply_digest: bytes  # SHA-256 of the reply payload
    macs: int  # the request's m * k * n
    price_per_gmac: int  # charged, at most the request's offer
    completed_at_ms: int  # Unix time in ms

    def __post_init__(self) -> None:
        for name in ("provider", "client"):
            _check_bytes(name, getattr(self, name), max_size=MAX_PEER_ID)
        _check_bytes("request_id", self.request_id, size=ID_SIZE)
        _check_bytes("request_digest", self.request_digest, size=DIGEST_SIZE)
        _check_bytes("reply_digest", self.reply_digest, size=DIGEST_SIZE)
        _check_uint("macs", self.macs)
        _check_uint("price_per_gmac", self.price_per_gmac)
        _check_uint("completed_at_ms", self.completed_at_ms)

    @property
    def amount(self) -> int:
        """The charge in the price's currency unit: macs * price_per_gmac / 10^9, rounded up."""
        return -(-self.macs * self.price_per_gmac // 10**9)

    def to_bytes(self) -> bytes:
        return pb.UsageReceipt(
            provider=self.provider,
            client=self.client,
            request_id=self.request_id,
            request_digest=self.request_digest,
            reply_digest=self.reply_digest,
            macs=self.macs,
            price_per_gmac=self.price_per_gmac,
            completed_at_ms=self.completed_at_ms,
        ).SerializeToString(deterministic=True)

    @classmethod
    def from_bytes(cls, data: bytes) -> UsageReceipt:
        msg = pb.UsageReceipt()
        try:
            msg.ParseFromString(data)
        except DecodeError as exc:
            raise ValueError(f"receipt does not decode: {exc}") from None
        return cls(
            provider=msg.provider,
            client=msg.client,
            request_id=msg.request_id,
            request_digest=msg.request_digest,
            reply_digest=msg.reply_digest,
            macs=msg.macs,
            price_per_gmac=msg.price_per_gmac,
            completed_at_ms=msg.completed_at_ms,
        )


@dataclass(frozen=True, kw_only=True)
class SignedReceipt:
    """A receipt as signed: the exact receipt bytes, the provider's signature and, once the client
    has verified the result, the client's countersignature. Build it with receipts.sign_receipt."""

    receipt_bytes: bytes
    provider_signature: bytes
    client_signature: bytes = b""  # empty until countersigned

    def __post_init__(self) -> None:
        _check_type("receipt_bytes", self.receipt_bytes, bytes)
        _check_bytes("provider_signature", self.provider_signature, size=SIGNATURE_SIZE)
        _check_type("client_signature", self.client_signature, bytes)
        if self.client_signature:
            _check_bytes("client_signature", self.client_signature, size=SIGNATURE_SIZE)
        self.receipt  # noqa: B018  # decode now, so an invalid receipt is refused at construction

    @cached_property
    def receipt(self) -> UsageReceipt:
        return UsageReceipt.from_bytes(self.receipt_bytes)

    def to_proto(self) -> pb.SignedReceipt:
        return pb.SignedReceipt(
            receipt=self.receipt_bytes,
            provider_signature=self.provider_signature,
            client_signature=self.client_signature,
        )

    @classmethod
    def from_proto(cls, msg: pb.SignedReceipt) -> SignedReceipt:
        return cls(
            receipt_bytes=msg.receipt,
            provider_signature=msg.provider_signature,
            client_signature=msg.client_signature,
        )


def _error_to_proto(error: WireError) -> pb.Error:
    return pb.Error(
        code=f"ERROR_CODE_{error.code.name}",  # by name, so the two enums cannot drift apart silently
        message=error.message,
        retry_after_ms=error.retry_after_ms,
        limit=error.limit,
    )


def _error_from_proto(msg: pb.Error) -> WireError:
    if len(msg.message.encode()) > MAX_ERROR_MESSAGE:
        raise ValueError(f"error message must be at most {MAX_ERROR_MESSAGE} bytes")
    if msg.code == ErrorCode.UNSPECIFIED:
        raise ValueError("error code must be specified")
    try:
        code = ErrorCode(msg.code)
    except ValueError:
        # A code from a newer minor version: read as INTERNAL (README, "Versioning").
        message = f"error code {msg.code}: {msg.message}".encode()[:MAX_ERROR_MESSAGE].decode(errors="ignore")
        return WireError(code=ErrorCode.INTERNAL, message=message)
    return WireError(code=code, message=msg.message, retry_after_ms=msg.retry_after_ms, limit=msg.limit)


@dataclass(frozen=True, kw_only=True, slots=True)
class MatmulReply:
    """A provider's answer: an encrypted result with a signed receipt, or an error. A streamed reply
    (1.2, `streamed`) carries neither the payload's digest nor a receipt: they come in the
    ReplyTrailer that follows its payload, once the provider has computed it all."""

    request_id: bytes  # the request's id; empty on an error reply to an undecodable request
    request_digest: bytes  # SHA-256 of the request's Body bytes; empty as request_id
    payload_sha256: bytes  # of the payload that follows, b"" on error; empty (b"") if streamed
    payload_length: int
    compute_time_us: int = 0
    error: WireError | None = None  # set iff the request failed
    receipt: SignedReceipt | None = None  # set iff it succeeded and is not streamed
    streamed: bool = False  # 1.2: digest, compute time and receipt follow the payload in a ReplyTrailer

    def __post_init__(self) -> None:
        _check_type("request_id", self.request_id, bytes)
        _check_type("request_digest", self.request_digest, bytes)
        _check_type("streamed", self.streamed, bool)
        if self.streamed:
            _check_bytes("payload_sha256", self.payload_sha256, size=0)
        else:
            _check_bytes("payload_sha256", self.payload_sha256, size=DIGEST_SIZE)
        _check_uint("payload_length", self.payload_length)
        _check_uint("compute_time_us", self.compute_time_us)
        if self.error is None:
            _check_bytes("request_id", self.request_id, size=ID_SIZE)
            _check_bytes("request_digest", self.request_digest, size=DIGEST_SIZE)
            if self.streamed:
                if self.receipt is not None or self.compute_time_us:
                    raise ValueError("a streamed reply's receipt and compute time come in its trailer")
            elif self.receipt is None:
                raise ValueError("a successful reply carries a receipt")
            else:
                _check_type("receipt", self.receipt, SignedReceipt)
        else:
            _check_type("error", self.error, WireError)
            if self.streamed:
                raise ValueError("an error reply is not streamed")
            if self.request_id or self.request_digest:
                _check_bytes("request_id", self.request_id, size=ID_SIZE)
                _check_bytes("request_digest", self.request_digest, size=DIGEST_SIZE)
            if self.receipt is not None:
                raise ValueError("an error reply carries no receipt")
            if self.payload_length:
                raise ValueError("an error reply carries no payload")

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_proto(self) -> pb.MatmulReply:
        msg = pb.MatmulReply(
            request_id=self.request_id,
            request_digest=self.request_digest,
            status=pb.STATUS_OK if self.error is None else pb.STATUS_ERROR,
            payload_sha256=self.payload_sha256,
            payload_length=self.payload_length,
            compute_time_us=self.compute_time_us,
            streamed=self.streamed,
        )
        if self.error is not None:
            msg.error.CopyFrom(_error_to_proto(self.error))
        if self.receipt is not None:
            msg.receipt.CopyFrom(self.receipt.to_proto())
        return msg

    @classmethod
    def from_proto(cls, msg: pb.MatmulReply) -> MatmulReply:
        if msg.status not in (pb.STATUS_OK, pb.STATUS_ERROR):
            raise ValueError(f"reply status must be OK or ERROR, got {msg.status}")
        if (msg.status == pb.STATUS_ERROR) != msg.HasField("error"):
            raise ValueError("a reply has an error iff its status is ERROR")
        return cls(
            request_id=msg.request_id,
            request_digest=msg.request_digest,
            payload_sha256=msg.payload_sha256,
            payload_length=msg.payload_length,
            compute_time_us=msg.compute_time_us,
            error=_error_from_proto(msg.error) if msg.HasField("error") else None,
            receipt=SignedReceipt.from_proto(msg.receipt) if msg.HasField("receipt") else None,
            streamed=msg.streamed,
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class ReplyTrailer:
    """1.2: the frame right after a streamed reply's payload (no payload of its own): what the
    reply's header would have carried had the payload been known when the header was sent."""

    request_id: bytes  # the request's id, as in the reply's header
    request_digest: bytes  # SHA-256 of the request's Body bytes, as in the reply's header
    payload_sha256: bytes  # of the streamed payload; the receipt's reply_digest
    receipt: SignedReceipt
    compute_time_us: int = 0

    def __post_init__(self) -> None:
        _check_bytes("request_id", self.request_id, size=ID_SIZE)
        _check_bytes("request_digest", self.request_digest, size=DIGEST_SIZE)
        _check_bytes("payload_sha256", self.payload_sha256, size=DIGEST_SIZE)
        _check_type("receipt", self.receipt, SignedReceipt)
        _check_uint("compute_time_us", self.compute_time_us)

    def to_proto(self) -> pb.ReplyTrailer:
        return pb.ReplyTrailer(
            request_id=self.request_id,
            request_digest=self.request_digest,
            payload_sha256=self.payload_sha256,
            compute_time_us=self.compute_time_us,
            receipt=self.receipt.to_proto(),
        )

    @classmethod
    def from_proto(cls, msg: pb.ReplyTrailer) -> ReplyTrailer:
        if not msg.HasField("receipt"):
            raise ValueError("a reply trailer carries a receipt")
        return cls(
            request_id=msg.request_id,
            request_digest=msg.request_digest,
            payload_sha256=msg.payload_sha256,
            compute_time_us=msg.compute_time_us,
            receipt=SignedReceipt.from_proto(msg.receipt),
        )


@dataclass(frozen=True, kw_only=True, slots=True)
class CapabilityAdvert:
    """A provider's offer; the signer of its envelope is the provider."""

    protocols: tuple[str, ...]  # stream protocol ids served, newest first
    addrs: tuple[bytes, ...]  # binary multiaddrs
    models: tuple[bytes, ...]  # DIGEST_SIZE-byte model content hashes
    backends: tuple[str, ...]  # engine names
    device: str  # "cpu", "cuda", ...
    macs_per_second: int  # measured encrypted multiply-accumulate rate
    price_per_gmac: int  # asked price per 10^9 multiply-accumulates
    free_slots: int  # requests it can take now
    max_payload_size: int  # largest request payload it reads
    issued_at_ms: int  # a newer advert from the same provider replaces an older one
    expires_at_ms: int  # ignore the advert from then on
    layers: tuple[bytes, ...] = ()  # DIGEST_SIZE-byte digests of the layers held; empty: all of every model
    # what one request may ask (README, section 8); 0: not stated, as in adverts from before these fields
    max_reply_size: int = 0  # largest reply payload it sends, in bytes
    max_output_elements: int = 0  # largest result it computes, in the engine's output elements
    min_contraction: int = 0  # fewest contraction features per request, unless the layer has fewer
    max_ttl_ms: int = 0  # longest request lifetime it accepts
    # its credit per client identity (README, section 8); 0: not stated
    max_unacked: int = 0  # requests admitted and not yet acknowledged by a countersigned receipt
    max_unacked_gmacs: int = 0  # their multiply-accumulates, in 10^9

    def __post_init__(self) -> None:
        _check_items("protocols", self.protocols, 16)
        if not self.protocols:
            raise ValueError("protocols must name at least one protocol id")
        for protocol in self.protocols:
            _check_text("protocol id", protocol, 128)
            if not protocol.startswith("/"):
                raise ValueError(f"protocol id must start with '/', got {protocol!r}")
        _check_items("addrs", self.addrs, 32)
        for addr in self.addrs:
            _check_bytes("addr", addr, max_size=256)
        _check_items("models", self.models, 1024)
        for model in self.models:
            _check_bytes("model hash", model, size=DIGEST_SIZE)
        _check_items("backends", self.backends, 16)
        for backend in self.backends:
            _check_text("backend", backend, MAX_BACKEND_NAME)
        _check_text("device", self.device, 32)
        _check_uint("macs_per_second", self.macs_per_second)
        _check_uint("price_per_gmac", self.price_per_gmac)
        _check_uint("free_slots", self.free_slots, MAX_UINT32)
        _check_uint("max_payload_size", self.max_payload_size)
        _check_uint("issued_at_ms", self.issued_at_ms)
        _check_uint("expires_at_ms", self.expires_at_ms)
        if self.issued_at_ms > self.expires_at_ms:
            raise ValueError("an advert must not expire before it is issued")
        _check_items("layers", self.layers, MAX_ADVERT_LAYERS)
        for layer in self.layers:
            _check_bytes("layer digest", layer, size=DIGEST_SIZE)
        for name in ("max_reply_size", "max_output_elements", "min_contraction", "max_ttl_ms", "max_unacked",
                     "max_unacked_gmacs"):
            _check_uint(name, getattr(self, name))

    def to_proto(self) -> pb.CapabilityAdvert:
        return pb.CapabilityAdvert(
            protocols=self.protocols,
            addrs=self.addrs,
            models=self.models,
            backends=self.backends,
            device=self.device,
            macs_per_second=self.macs_per_second,
            price_per_gmac=self.price_per_gmac,
            free_slots=self.free_slots,
            max_payload_size=self.max_payload_size,
            issued_at_ms=self.issued_at_ms,
            expires_at_ms=self.expires_at_ms,
            layers=self.layers,
            max_reply_size=self.max_reply_size,
            max_output_elements=self.max_output_elements,
            min_contraction=self.min_contraction,
            max_ttl_ms=self.max_ttl_ms,
            max_unacked=self.max_unacked,
            max_unacked_gmacs=self.max_unacked_gmacs,
        )

    @classmethod
    def from_proto(cls, msg: pb.CapabilityAdvert) -> CapabilityAdvert:
        return cls(
            protocols=tuple(msg.protocols),
            addrs=tuple(msg.addrs),
            models=tuple(msg.models),
            backends=tuple(msg.backends),
            device=msg.device,
            macs_per_second=msg.macs_per_second,
            price_per_gmac=msg.price_per_gmac,
            free_slots=msg.free_slots,
            max_payload_size=msg.max_payload_size,
            issued_at_ms=msg.issued_at_ms,
            expires_at_ms=msg.expires_at_ms,
            layers=tuple(msg.layers),
            max_reply_size=msg.max_reply_size,
            max_output_elements=msg.max_output_elements,
            min_contraction=msg.min_contraction,
            max_ttl_ms=msg.max_ttl_ms,
            max_unacked=msg.max_unacked,
            max_unacked_gmacs=msg.max_unacked_gmacs,
        )


Message: TypeAlias = MatmulRequest | MatmulReply | SignedReceipt | CapabilityAdvert | ReplyTrailer
"""What a frame header carries: one of the Body kinds."""



def encode_body(message: Message) -> bytes:
    body = pb.Body()
    if isinstance(message, MatmulRequest):
        body.request.CopyFrom(message.to_proto())
    elif isinstance(message, MatmulReply):
        body.reply.CopyFrom(message.to_proto())
    elif isinstance(message, SignedReceipt):
        body.receipt.CopyFrom(message.to_proto())
    elif isinstance(message, CapabilityAdvert):
        body.advert.CopyFrom(message.to_proto())
    elif isinstance(message, ReplyTrailer):
        body.trailer.CopyFrom(message.to_proto())
    else:
        raise TypeError(f"not a message: {type(message).__name__}")
    return body.SerializeToString(deterministic=True)


def _message_of(body: pb.Body) -> Message:
    match body.WhichOneof("kind"):
        case "request":
            return MatmulRequest.from_proto(body.request)
        case "reply":
            return MatmulReply.from_proto(body.reply)
        case "receipt":
            return SignedReceipt.from_proto(body.receipt)
        case "advert":
            return CapabilityAdvert.from_proto(body.advert)
        case "trailer":
            return ReplyTrailer.from_proto(body.trailer)
    raise ValueError("body carries no message")  # empty, or a kind from a newer minor version


def decode_body(data: bytes) -> Message:
    """The message in a Body; MalformedFrame on any decoding or validation failure."""
    body = pb.Body()
    try:
        body.ParseFromString(data)
        return _message_of(body)
    except (DecodeError, ValueError) as exc:
        raise MalformedFrame(f"invalid {body.WhichOneof('kind') or 'body'}: {exc}") from None


def payload_length(message: Message) -> int:
    """Bytes of payload that follow a header carrying `message` (only requests and replies have one)."""
    if isinstance(message, (MatmulRequest, MatmulReply)):
        return message.payload_length
    return 0
