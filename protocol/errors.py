"""Typed protocol errors and their wire form.

Every way a frame can be refused is one exception class under `ProtocolError`, carrying fields rather
than a string to match, and one wire `ErrorCode`. `WireError` is the `Error` message of a reply; it
converts to and from exceptions, so a provider answers any failure with `WireError.from_exception`
and a client re-raises the provider's answer with `WireError.to_exception`.

Every failed authenticity check (signature, key-to-peer binding, digests, receipt terms) is one
class, `BadSignature`, and one wire message, so a peer probing with forged frames learns nothing
about which check it tripped. The local `reason` is for logs only and never leaves the process.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

if TYPE_CHECKING:
    from .envelope import Header

MAX_ERROR_MESSAGE = 1024
"""Bytes of UTF-8 in `Error.message`; longer messages are cut when sent and refused when read."""


class ErrorCode(enum.IntEnum):
    """Wire error codes (`ErrorCode` in the .proto, without its ERROR_CODE_ prefix)."""

    UNSPECIFIED = 0
    BAD_FRAME = 1
    TOO_LARGE = 2
    BAD_SIGNATURE = 3
    REPLAY = 4
    EXPIRED = 5
    UNKNOWN_MODEL = 6
    SHAPE_MISMATCH = 7
    UNSUPPORTED_PARAMS = 8
    BUSY = 9
    TIMEOUT = 10
    INTERNAL = 11
    PAYMENT = 12


class ProtocolError(Exception):
    """Base of every refusal the wire layer raises or reads from a peer.

    `remote` is True on an error decoded from a peer's reply (the peer refused our frame) and False
    on one raised here (we refused the peer's frame). Fields that only the refusing side knows are
    None on a remote error.
    """

    code: ClassVar[ErrorCode] = ErrorCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.remote = False

    @property
    def message(self) -> str:
        return str(self.args[0])

    @property
    def wire_message(self) -> str:
        """What a peer is told; subclasses that must not leak details override it."""
        return self.message


class MalformedFrame(ProtocolError):
    """A frame that does not decode, or decodes to values the specification forbids."""

    code = ErrorCode.BAD_FRAME

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TruncatedFrame(MalformedFrame):
    """The stream ended inside a frame (or, with `is_clean_close`, before its first byte)."""

    def __init__(self, *, expected_bytes: int, received_bytes: int) -> None:
        super().__init__(f"stream ended after {received_bytes} of {expected_bytes} frame bytes")
        self.expected_bytes = expected_bytes
        self.received_bytes = received_bytes

    @property
    def is_clean_close(self) -> bool:
        """True if the peer closed between frames, which ends a conversation without error."""
        return self.received_bytes == 0


class FrameTooLarge(ProtocolError):
    """A header or payload declared larger than the receiver's limit; refused before reading it."""

    code = ErrorCode.TOO_LARGE

    def __init__(self, limit: int, got: int | None = None, *, what: str = "frame", unit: str = "bytes") -> None:
        size = "" if got is None else f" of {got} {unit}"
        super().__init__(f"{what}{size} exceeds the limit of {limit} {unit}")
        self.limit = limit
        self.got = got
        self.what = what


class PayloadTooLarge(FrameTooLarge):
    """A frame whose decoded header declares a payload over the receiver's limit, refused after the
    header: `header` (not verified) lets a provider's refusal name the request (README section 6,
    `MatmulReply.request_id`)."""

    def __init__(self, limit: int, got: int, *, header: Header) -> None:
        super().__init__(limit, got, what="payload")
        self.header = header


class ReplyTooLarge(FrameTooLarge):
    """A request whose reply would exceed what the provider advertises it sends (`what` "reply", in
    bytes: max_reply_size) or computes (`what` "output", in output elements: max_output_elements);
    refused from its header, before anything is allocated for it. Cut smaller chunks."""

    def __init__(self, limit: int, got: int | None = None, *, what: str = "reply") -> None:
        super().__init__(limit, got, what=what, unit="output elements" if what == "output" else "bytes")


class BadSignature(ProtocolError):
    """Any authenticity check failed. Peers are only told "verification failed"."""

    code = ErrorCode.BAD_SIGNATURE
    WIRE_MESSAGE: ClassVar[str] = "verification failed"

    def __init__(self, reason: str = WIRE_MESSAGE) -> None:
        super().__init__(reason)
        self.reason = reason

    @property
    def wire_message(self) -> str:
        return self.WIRE_MESSAGE


class ReplayedFrame(ProtocolError):
    """A nonce the receiver has already accepted within its replay window."""

    code = ErrorCode.REPLAY

    def __init__(self, nonce: bytes | None = None) -> None:
        super().__init__("nonce already used" if nonce is None else f"nonce {nonce.hex()} already used")
        self.nonce = nonce


class ExpiredFrame(ProtocolError):
    """An expiry outside (now, not_after]: already past, or further ahead than the receiver allows."""

    code = ErrorCode.EXPIRED

    def __init__(
        self, *, expires_at_ms: int | None = None, now_ms: int | None = None, not_after_ms: int | None = None
    ) -> None:
        if expires_at_ms is None or now_ms is None:
            message = "frame expired"
        elif expires_at_ms <= now_ms:
            message = f"frame expired at {expires_at_ms} ms, now is {now_ms} ms"
        else:
            message = f"frame expires at {expires_at_ms} ms, later than the allowed {not_after_ms} ms"
        super().__init__(message)
        self.expires_at_ms = expires_at_ms
        self.now_ms = now_ms
        self.not_after_ms = not_after_ms


class UnknownModel(ProtocolError):
    """The provider holds no such model hash or no such layer in it: look for another provider."""

    code = ErrorCode.UNKNOWN_MODEL

    def __init__(self, model_hash: bytes | None = None, layer: str | None = None) -> None:
        if model_hash is None:
            message = "model or layer not held"
        else:
            message = f"layer {layer!r} of model {model_hash.hex()} not held"
        super().__init__(message)
        self.model_hash = model_hash
        self.layer = layer


class ShapeMismatch(ProtocolError):
    """The weight slice or the operand shapes do not fit the layer or each other."""

    code = ErrorCode.SHAPE_MISMATCH

    def __init__(
        self,
        what: str,
        *,
        expected: tuple[int, ...] | None = None,
        got: tuple[int, ...] | None = None,
    ) -> None:
        detail = "" if expected is None else f": expected {expected}, got {got}"
        super().__init__(f"{what}{detail}")
        self.what = what
        self.expected = expected
        self.got = got


class ContractionTooThin(ShapeMismatch):
    """A request contracting over fewer features than the provider's advertised `min_contraction`
    (and fewer than its layer has): a thin slice costs the sender a sliver of payload and the
    provider a full-width product and reply, so it only amplifies."""

    def __init__(self, *, minimum: int, got: int) -> None:
        super().__init__("contraction below the minimum", expected=(minimum,), got=(got,))
        self.minimum = minimum


class UnsupportedParams(ProtocolError):
    """The backend, or its parameters, are not served by this provider."""

    code = ErrorCode.UNSUPPORTED_PARAMS

    def __init__(self, reason: str, *, backend: str | None = None) -> None:
        super().__init__(reason if backend is None else f"backend {backend!r}: {reason}")
        self.reason = reason
        self.backend = backend


class Busy(ProtocolError):
    """No capacity now: retry after `retry_after_ms` milliseconds, here or elsewhere."""

    code = ErrorCode.BUSY

    def __init__(self, retry_after_ms: int, reason: str = "busy") -> None:
        super().__init__(f"{reason}; retry after {retry_after_ms} ms")
        self.retry_after_ms = retry_after_ms


class DeadlineExceeded(ProtocolError):
    """A read, a write or the computation ran past its deadline."""

    code = ErrorCode.TIMEOUT

    def __init__(self, what: str, *, timeout_s: float | None = None) -> None:
        super().__init__(what if timeout_s is None else f"{what} took longer than {timeout_s} s")
        self.what = what
        self.timeout_s = timeout_s


class InternalError(ProtocolError):
    """The peer failed for a reason of its own; retrying elsewhere may help."""

    code = ErrorCode.INTERNAL


class PaymentRequired(ProtocolError):
    """The offered price is below the provider's asked price."""

    code = ErrorCode.PAYMENT

    def __init__(self, *, asked: int, offered: int | None = None) -> None:
        offer = "" if offered is None else f"{offered} offered, "
        super().__init__(f"{offer}{asked} asked per 10^9 multiply-accumulates")
        self.asked = asked
        self.offered = offered


@dataclass(frozen=True, kw_only=True, slots=True)
class WireError:
    """The `Error` message of a reply."""

    code: ErrorCode  # never UNSPECIFIED
    message: str  # at most MAX_ERROR_MESSAGE bytes of UTF-8
    retry_after_ms: int = 0  # BUSY only
    limit: int = 0  # TOO_LARGE: size limit in bytes; PAYMENT: asked price per GMAC

    def __post_init__(self) -> None:
        if not isinstance(self.code, ErrorCode) or self.code is ErrorCode.UNSPECIFIED:
            raise ValueError("error code must be a specified ErrorCode")
        if len(self.message.encode()) > MAX_ERROR_MESSAGE:
            raise ValueError(f"error message must be at most {MAX_ERROR_MESSAGE} bytes")

    @classmethod
    def from_exception(cls, exc: BaseException) -> WireError:
        """What to tell a peer about `exc`. Anything but a ProtocolError is a bare INTERNAL, so a bug's
        text (paths, values, key material) never reaches the peer."""
        if not isinstance(exc, ProtocolError):
            return cls(code=ErrorCode.INTERNAL, message="internal error")
        message = exc.wire_message.encode()[:MAX_ERROR_MESSAGE].decode(errors="ignore")
        if isinstance(exc, FrameTooLarge):
            return cls(code=exc.code, message=message, limit=exc.limit)
        if isinstance(exc, PaymentRequired):
            return cls(code=exc.code, message=message, limit=exc.asked)
        if isinstance(exc, Busy):
            return cls(code=exc.code, message=message, retry_after_ms=exc.retry_after_ms)
        return cls(code=exc.code, message=message)

    def to_exception(self) -> ProtocolError:
        """The typed exception for a peer's error reply, with `remote` set. Fields only the peer
        knew are None; the peer's text is kept where the class has a free-text field."""
        exc: ProtocolError
        match self.code:
            case ErrorCode.BAD_FRAME:
                exc = MalformedFrame(self.message)
            case ErrorCode.TOO_LARGE:
                exc = FrameTooLarge(self.limit)
            case ErrorCode.BAD_SIGNATURE:
                exc = BadSignature()
            case ErrorCode.REPLAY:
                exc = ReplayedFrame()
            case ErrorCode.EXPIRED:
                exc = ExpiredFrame()
            case ErrorCode.UNKNOWN_MODEL:
                exc = UnknownModel()
            case ErrorCode.SHAPE_MISMATCH:
                exc = ShapeMismatch(self.message)
            case ErrorCode.UNSUPPORTED_PARAMS:
                exc = UnsupportedParams(self.message)
            case ErrorCode.BUSY:
                exc = Busy(self.retry_after_ms)
            case ErrorCode.TIMEOUT:
                exc = DeadlineExceeded(self.message)
            case ErrorCode.PAYMENT:
                exc = PaymentRequired(asked=self.limit)
            case _:
                exc = InternalError(self.message)
        exc.remote = True
        return exc
