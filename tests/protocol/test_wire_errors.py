"""Typed errors: one class per wire code, and the mapping between exceptions and `Error` messages."""

from __future__ import annotations

import pytest

from cipherswarm.protocol import (
    BadSignature,
    ContractionTooThin,
    ErrorCode,
    FrameTooLarge,
    InternalError,
    MalformedFrame,
    PayloadTooLarge,
    ProtocolError,
    ReplyTooLarge,
    ShapeMismatch,
    TruncatedFrame,
    WireError,
)
from cipherswarm.protocol import errors as errors_module

CLASSES = [
    cls
    for cls in vars(errors_module).values()
    if isinstance(cls, type) and issubclass(cls, ProtocolError) and cls is not ProtocolError
]


#: refinements of a code's class that carry fields of their own, sent under that code
REFINEMENTS = {TruncatedFrame: MalformedFrame, ReplyTooLarge: FrameTooLarge, PayloadTooLarge: FrameTooLarge,
               ContractionTooThin: ShapeMismatch}


def test_every_specified_code_has_its_own_class() -> None:
    top_level = {cls.code: cls for cls in CLASSES if cls not in REFINEMENTS}
    assert len(top_level) == len(CLASSES) - len(REFINEMENTS)
    assert set(top_level) == set(ErrorCode) - {ErrorCode.UNSPECIFIED}
    for refinement, parent in REFINEMENTS.items():
        assert top_level[refinement.code] is parent and issubclass(refinement, parent)


def test_refused_replies_report_their_limit_and_unit() -> None:
    """The bound a request's reply or output exceeded travels in `limit`, in its own unit."""
    output = ReplyTooLarge(1 << 25, 1 << 27, what="output")
    assert "134217728 output elements exceeds the limit of 33554432 output elements" in output.message
    assert WireError.from_exception(output) == WireError(code=ErrorCode.TOO_LARGE, message=output.message, limit=1 << 25)
    assert "bytes" in ReplyTooLarge(100, 200).message
    thin = ContractionTooThin(minimum=64, got=1)
    assert WireError.from_exception(thin).code is ErrorCode.SHAPE_MISMATCH and (thin.expected, thin.got) == ((64,), (1,))


@pytest.mark.parametrize("code", [code for code in ErrorCode if code is not ErrorCode.UNSPECIFIED], ids=str)
def test_wire_round_trip_keeps_class_and_wire_fields(code: ErrorCode) -> None:
    wire = WireError(code=code, message="peer's words", retry_after_ms=7, limit=9)
    error = wire.to_exception()
    assert error.code is code and error.remote
    again = WireError.from_exception(error)
    assert again.code is code
    assert again.retry_after_ms == (7 if code is ErrorCode.BUSY else 0)
    assert again.limit == (9 if code in (ErrorCode.TOO_LARGE, ErrorCode.PAYMENT) else 0)


def test_bad_signature_reason_stays_local() -> None:
    error = BadSignature("signing key does not belong to the expected peer")
    assert error.reason in str(error)
    assert WireError.from_exception(error).message == "verification failed"


def test_long_messages_are_cut_to_the_wire_limit() -> None:
    wire = WireError.from_exception(InternalError("é" * 2000))
    assert len(wire.message.encode()) <= errors_module.MAX_ERROR_MESSAGE
    assert wire.message.startswith("éé")


def test_fields_not_strings() -> None:
    error = FrameTooLarge(100, 200, what="payload")
    assert (error.limit, error.got, error.what, error.code) == (100, 200, "payload", ErrorCode.TOO_LARGE)
    assert str(error) == "payload of 200 bytes exceeds the limit of 100 bytes"


@pytest.mark.parametrize(("received", "clean"), [(0, True), (1, False)])
def test_truncation_at_a_frame_boundary_is_a_clean_close(received: int, clean: bool) -> None:
    assert TruncatedFrame(expected_bytes=5, received_bytes=received).is_clean_close is clean
