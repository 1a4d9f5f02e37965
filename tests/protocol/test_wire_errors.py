"""Typed errors: one class per wire code, and the mapping between exceptions and `Error` messages."""

from __future__ import annotations

import pytest

from cipherswarm.protocol import (
    BadSignature,
    ErrorCode,
    FrameTooLarge,
    InternalError,
    ProtocolError,
    TruncatedFrame,
    WireError,
)
from cipherswarm.protocol import errors as errors_module

CLASSES = [
    cls
    for cls in vars(errors_module).values()
    if isinstance(cls, type) and issubclass(cls, ProtocolError) and cls is not ProtocolError
]


def test_every_specified_code_has_its_own_class() -> None:
    # TruncatedFrame is the one refinement: a MalformedFrame that carries byte counts.
    top_level = {cls.code: cls for cls in CLASSES if cls is not TruncatedFrame}
    assert len(top_level) == len(CLASSES) - 1
    assert set(top_level) == set(ErrorCode) - {ErrorCode.UNSPECIFIED}
    assert issubclass(TruncatedFrame, top_level[ErrorCode.BAD_FRAME])


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
