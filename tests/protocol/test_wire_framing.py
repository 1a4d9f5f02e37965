"""Framing: varints, limits enforced before reading or allocating, truncation, canonical envelopes."""

from __future__ import annotations

import dataclasses
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from wire_factory import CLIENT, CLIENT_KEY, LIMITS, PAYLOAD, make_advert, make_request, request_frame

from cipherswarm.protocol import (
    MAX_HEADER_SIZE,
    FrameTooLarge,
    Limits,
    MalformedFrame,
    TruncatedFrame,
    decode_frame,
    encode_frame,
    frame_prefix,
    read_frame_sync,
    seal,
)
from cipherswarm.protocol import cipherswarm_matmul_v1_pb2 as pb
from cipherswarm.protocol.varint import MAX_VARINT_VALUE, encode_uvarint, uvarint_reader


def decode_uvarint(data: bytes) -> int:
    reader = uvarint_reader()
    want = next(reader)
    stream = io.BytesIO(data)
    try:
        while True:
            want = reader.send(stream.read(want))
    except StopIteration as done:
        assert stream.tell() == len(data), "reader consumed the wrong number of bytes"
        return done.value


class RecordingReader:
    """A read_exactly that serves `data` and then endless filler, remembering every request."""

    def __init__(self, data: bytes) -> None:
        self.stream = io.BytesIO(data)
        self.requests: list[int] = []

    def __call__(self, n: int) -> bytes:
        self.requests.append(n)
        data = self.stream.read(n)
        return data + b"\x00" * (n - len(data))


class TestVarint:
    @pytest.mark.parametrize(
        ("value", "encoded"),
        [
            (0, "00"),
            (1, "01"),
            (127, "7f"),
            (128, "8001"),
            (255, "ff01"),
            (300, "ac02"),
            (16384, "808001"),
            (MAX_VARINT_VALUE, "ffffffffffffffff7f"),
        ],
    )
    def test_known_answers(self, value: int, encoded: str) -> None:
        assert encode_uvarint(value).hex() == encoded
        assert decode_uvarint(bytes.fromhex(encoded)) == value

    @given(st.integers(0, MAX_VARINT_VALUE))
    def test_round_trip(self, value: int) -> None:
        assert decode_uvarint(encode_uvarint(value)) == value

    @pytest.mark.parametrize("encoded", ["8000", "ff00", "808000"])
    def test_non_minimal_refused(self, encoded: str) -> None:
        with pytest.raises(MalformedFrame, match="minimal"):
            decode_uvarint(bytes.fromhex(encoded))

    def test_longer_than_nine_bytes_refused(self) -> None:
        with pytest.raises(MalformedFrame, match="9 bytes"):
            decode_uvarint(b"\xff" * 9 + b"\x01")

    @pytest.mark.parametrize("value", [-1, 2**63])
    def test_out_of_range_not_encoded(self, value: int) -> None:
        with pytest.raises(ValueError):
            encode_uvarint(value)


class TestLimits:
    @pytest.mark.parametrize("declared", [MAX_HEADER_SIZE + 1, 2**40, MAX_VARINT_VALUE])
    def test_oversized_header_refused_before_reading_it(self, declared: int) -> None:
        reader = RecordingReader(encode_uvarint(declared))
        with pytest.raises(FrameTooLarge) as caught:
            read_frame_sync(reader, limits=LIMITS)
        assert (caught.value.limit, caught.value.got, caught.value.what) == (MAX_HEADER_SIZE, declared, "header")
        assert reader.requests == [1] * len(encode_uvarint(declared))  # only the prefix, byte by byte

    def test_receiver_may_lower_the_header_limit(self) -> None:
        _, data = request_frame()
        with pytest.raises(FrameTooLarge, match="header"):
            decode_frame(data, limits=Limits(max_payload_size=1 << 16, max_header_size=100))

    def test_oversized_payload_refused_before_reading_it(self) -> None:
        huge = 2**62
        sealed = seal(dataclasses.replace(make_request(), payload_length=huge), CLIENT_KEY)  # a signed lie about the size
        prefix = encode_uvarint(len(sealed.header)) + sealed.header
        reader = RecordingReader(prefix)
        with pytest.raises(FrameTooLarge) as caught:
            read_frame_sync(reader, limits=LIMITS)
        assert (caught.value.limit, caught.value.got, caught.value.what) == (LIMITS.max_payload_size, huge, "payload")
        assert max(reader.requests) == len(sealed.header)

    @pytest.mark.parametrize("kwargs", [{"max_payload_size": -1}, {"max_payload_size": 1, "max_header_size": MAX_HEADER_SIZE + 1}])
    def test_limits_validated(self, kwargs: dict[str, int]) -> None:
        with pytest.raises(ValueError):
            Limits(**kwargs)


class TestFrames:
    def test_round_trip_with_payload(self) -> None:
        sealed, data = request_frame()
        frame = decode_frame(data, limits=LIMITS)
        assert frame.payload == PAYLOAD
        assert frame.header.message == sealed.message
        assert frame.header.verify(CLIENT) == CLIENT

    def test_frames_follow_each_other_on_a_stream(self) -> None:
        first, second = request_frame(), request_frame(b"other payload")
        advert = seal(make_advert(), CLIENT_KEY)
        stream = io.BytesIO(first[1] + encode_frame(advert) + second[1])
        read = [read_frame_sync(stream.read, limits=LIMITS) for _ in range(3)]
        assert [frame.header.message for frame in read] == [first[0].message, advert.message, second[0].message]
        assert [frame.payload for frame in read] == [PAYLOAD, b"", b"other payload"]

    def test_every_truncation_refused(self) -> None:
        _, data = request_frame()
        for cut in range(len(data)):
            with pytest.raises(TruncatedFrame) as caught:
                decode_frame(data[:cut], limits=LIMITS)
            assert caught.value.received_bytes == cut
            assert caught.value.is_clean_close == (cut == 0)

    def test_trailing_bytes_refused(self) -> None:
        _, data = request_frame()
        with pytest.raises(MalformedFrame, match="after the frame"):
            decode_frame(data + b"\x00", limits=LIMITS)

    def test_payload_must_match_the_declared_length(self) -> None:
        sealed, _ = request_frame()
        with pytest.raises(ValueError, match="declares"):
            frame_prefix(sealed, PAYLOAD + b"!")

    def test_read_exactly_returning_too_much_is_a_caller_bug(self) -> None:
        _, data = request_frame()
        with pytest.raises(ValueError, match="wanted"):
            read_frame_sync(lambda n: data, limits=LIMITS)


def _envelope_fields(header: bytes) -> pb.Envelope:
    envelope = pb.Envelope()
    envelope.ParseFromString(header)
    return envelope


class TestCanonicalEnvelope:
    """The envelope is unsigned: every encoding but the canonical one is refused."""

    def _frame(self, header: bytes) -> bytes:
        return encode_uvarint(len(header)) + header + PAYLOAD

    def _fields(self) -> tuple[bytes, bytes, bytes]:
        sealed, _ = request_frame()
        envelope = _envelope_fields(sealed.header)
        return envelope.public_key, envelope.body, envelope.signature

    @staticmethod
    def _field(number: int, value: bytes) -> bytes:
        return encode_uvarint(number << 3 | 2) + encode_uvarint(len(value)) + value

    def test_canonical_form_is_accepted(self) -> None:
        key, body, signature = self._fields()
        header = self._field(1, key) + self._field(2, body) + self._field(3, signature)
        assert decode_frame(self._frame(header), limits=LIMITS).header.verify(CLIENT) == CLIENT

    @pytest.mark.parametrize(
        "layout",
        [
            pytest.param(lambda f, k, b, s: f(2, b) + f(1, k) + f(3, s), id="reordered"),
            pytest.param(lambda f, k, b, s: f(1, k) + f(2, b) + f(3, s) + f(4, b"x"), id="unknown field"),
            pytest.param(lambda f, k, b, s: f(1, k) + f(2, b) + f(3, s) + f(3, s), id="repeated field"),
            pytest.param(lambda f, k, b, s: f(1, b"junk") + f(1, k) + f(2, b) + f(3, s), id="overridden field"),
            pytest.param(lambda f, k, b, s: f(1, k) + f(2, b) + b"\x9a\x00" + encode_uvarint(64) + s, id="long tag"),
        ],
    )
    def test_other_encodings_refused(self, layout) -> None:  # type: ignore[no-untyped-def]
        header = layout(self._field, *self._fields())
        with pytest.raises(MalformedFrame):
            decode_frame(self._frame(header), limits=LIMITS)
