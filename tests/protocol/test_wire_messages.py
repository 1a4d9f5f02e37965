"""Messages: round trips of every kind, constructor validation, decoding of invalid bodies, and the
generated code's agreement with the .proto."""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from wire_factory import CLIENT, PROVIDER, PROVIDER_KEY, make_advert, make_request

from cipherswarm.protocol import (
    CapabilityAdvert,
    ErrorCode,
    MalformedFrame,
    MatmulReply,
    MatmulRequest,
    Range,
    SignedReceipt,
    UsageReceipt,
    WeightSlice,
    WireError,
    decode_header,
    seal,
    sign_receipt,
)
from cipherswarm.protocol import cipherswarm_matmul_v1_pb2 as pb
from cipherswarm.protocol.messages import MAX_DIM, decode_body, encode_body, sha256

PROTOCOL_DIR = pathlib.Path(__file__).resolve().parents[2] / "protocol"

uint64 = st.integers(0, 2**64 - 1)
dims = st.integers(1, MAX_DIM)
digests = st.binary(min_size=32, max_size=32)
ids16 = st.binary(min_size=16, max_size=16)
names = st.text(min_size=1, max_size=8)  # at most 32 bytes of UTF-8


@st.composite
def ranges(draw: st.DrawFn) -> Range:
    start = draw(st.integers(0, MAX_DIM - 1))
    return Range(start, draw(st.integers(start + 1, MAX_DIM)))


requests = st.builds(
    MatmulRequest,
    request_id=ids16,
    nonce=ids16,
    expires_at_ms=uint64,
    model_hash=digests,
    layer=names,
    weight_slice=st.builds(WeightSlice, rows=ranges(), cols=ranges()),
    transpose=st.booleans(),
    backend=names,
    backend_params=st.binary(max_size=64),
    mask_seeds=st.lists(digests, max_size=3).map(tuple),
    input_shape=st.tuples(dims, dims),
    output_shape=st.tuples(dims, dims),
    payload_sha256=digests,
    payload_length=uint64,
    price_per_gmac=uint64,
)
receipts = st.builds(
    UsageReceipt,
    provider=st.sampled_from([CLIENT, PROVIDER]),
    client=st.binary(min_size=1, max_size=64),
    request_id=ids16,
    request_digest=digests,
    reply_digest=digests,
    macs=uint64,
    price_per_gmac=uint64,
    completed_at_ms=uint64,
)
signed_receipts = st.builds(
    lambda receipt, provider_signature, client_signature: SignedReceipt(
        receipt_bytes=receipt.to_bytes(), provider_signature=provider_signature, client_signature=client_signature
    ),
    receipts,
    st.binary(min_size=64, max_size=64),
    st.one_of(st.just(b""), st.binary(min_size=64, max_size=64)),
)
wire_errors = st.builds(
    WireError,
    code=st.sampled_from([code for code in ErrorCode if code is not ErrorCode.UNSPECIFIED]),
    message=st.text(max_size=50),
    retry_after_ms=uint64,
    limit=uint64,
)
ok_replies = st.builds(
    MatmulReply,
    request_id=ids16,
    request_digest=digests,
    payload_sha256=digests,
    payload_length=uint64,
    compute_time_us=uint64,
    receipt=signed_receipts,
)
error_replies = st.builds(
    lambda named, request_id, request_digest, **fields: MatmulReply(
        request_id=request_id if named else b"", request_digest=request_digest if named else b"", **fields
    ),
    st.booleans(),
    ids16,
    digests,
    payload_sha256=digests,
    payload_length=st.just(0),
    compute_time_us=uint64,
    error=wire_errors,
)
adverts = st.builds(
    CapabilityAdvert,
    protocols=st.lists(names.map(lambda name: "/" + name), min_size=1, max_size=3).map(tuple),
    addrs=st.lists(st.binary(min_size=1, max_size=40), max_size=3).map(tuple),
    models=st.lists(digests, max_size=3).map(tuple),
    backends=st.lists(names, max_size=3).map(tuple),
    device=names,
    macs_per_second=uint64,
    price_per_gmac=uint64,
    free_slots=st.integers(0, 2**32 - 1),
    max_payload_size=uint64,
    issued_at_ms=st.integers(0, 2**63),
    expires_at_ms=st.integers(2**63, 2**64 - 1),
    layers=st.lists(digests, max_size=3).map(tuple),
)
messages = st.one_of(requests, ok_replies, error_replies, signed_receipts, adverts)


class TestRoundTrip:
    @settings(max_examples=300)
    @given(messages)
    def test_body(self, message: Any) -> None:
        assert decode_body(encode_body(message)) == message

    @settings(max_examples=50)
    @given(messages)
    def test_sealed_header(self, message: Any) -> None:
        sealed = seal(message, PROVIDER_KEY)
        header = decode_header(sealed.header)
        assert header.message == message
        assert header.digest == sealed.digest
        assert header.verify(PROVIDER) == PROVIDER == sealed.signer

    @given(receipts)
    def test_receipt_bytes(self, receipt: UsageReceipt) -> None:
        assert UsageReceipt.from_bytes(receipt.to_bytes()) == receipt

    def test_unknown_fields_of_a_newer_minor_version_are_ignored(self) -> None:
        request = make_request()
        body = pb.Body()
        body.ParseFromString(encode_body(request))
        newer = body.SerializeToString() + bytes([0xA0, 0x06, 0x07])  # field 100, varint 7
        assert decode_body(newer) == request


class TestValidation:
    @pytest.mark.parametrize(
        ("change", "error"),
        [
            ({"request_id": b"short"}, ValueError),
            ({"nonce": "0123456789abcdef"}, TypeError),
            ({"expires_at_ms": -1}, ValueError),
            ({"expires_at_ms": 2**64}, ValueError),
            ({"model_hash": b"\x00" * 31}, ValueError),
            ({"layer": ""}, ValueError),
            ({"layer": "x" * 257}, ValueError),
            ({"transpose": 1}, TypeError),
            ({"backend": "b" * 33}, ValueError),
            ({"backend_params": bytearray(b"p")}, TypeError),
            ({"mask_seeds": [b"\x00" * 32]}, TypeError),
            ({"mask_seeds": (b"\x00" * 16,)}, ValueError),
            ({"input_shape": (4, 16, 1)}, ValueError),
            ({"input_shape": (0, 16)}, ValueError),
            ({"output_shape": (4, MAX_DIM + 1)}, ValueError),
            ({"payload_length": True}, TypeError),
            ({"price_per_gmac": 2**64}, ValueError),
            ({"weight_slice": (Range(0, 1), Range(0, 1))}, TypeError),
            ({"group": ["k"]}, TypeError),
            ({"group": ("",)}, ValueError),
            ({"group": ("x" * 257,)}, ValueError),
            ({"group": tuple(f"l{i}" for i in range(16))}, ValueError),  # 17 layers in all
        ],
    )
    def test_request(self, change: dict[str, Any], error: type[Exception]) -> None:
        with pytest.raises(error):
            dataclasses.replace(make_request(), **change)

    @pytest.mark.parametrize(("start", "stop"), [(3, 3), (4, 3), (-1, 2), (0, MAX_DIM + 1)])
    def test_range(self, start: int, stop: int) -> None:
        with pytest.raises(ValueError):
            Range(start, stop)

    def test_ok_reply_needs_a_receipt(self) -> None:
        with pytest.raises(ValueError, match="receipt"):
            MatmulReply(request_id=b"i" * 16, request_digest=b"d" * 32, payload_sha256=sha256(b""), payload_length=0)

    def test_error_reply_has_no_payload(self) -> None:
        with pytest.raises(ValueError, match="no payload"):
            MatmulReply(
                request_id=b"",
                request_digest=b"",
                payload_sha256=sha256(b""),
                payload_length=1,
                error=WireError(code=ErrorCode.BUSY, message="busy"),
            )

    @pytest.mark.parametrize(
        "change",
        [
            {"protocols": ()},
            {"protocols": ("cipherswarm/matmul/1.0.0",)},
            {"models": (b"short",)},
            {"free_slots": 2**32},
            {"expires_at_ms": 0},
            {"addrs": (b"",)},
            {"layers": (b"short",)},
            {"layers": (b"\x00" * 32,) * 1025},
        ],
    )
    def test_advert(self, change: dict[str, Any]) -> None:
        with pytest.raises(ValueError):
            make_advert(**change)

    def test_wire_error(self) -> None:
        with pytest.raises(ValueError, match="specified"):
            WireError(code=ErrorCode.UNSPECIFIED, message="")
        with pytest.raises(ValueError, match="1024"):
            WireError(code=ErrorCode.INTERNAL, message="é" * 513)

    def test_signed_receipt_is_decoded_on_construction(self) -> None:
        with pytest.raises(ValueError):
            SignedReceipt(receipt_bytes=b"\xff", provider_signature=b"s" * 64)


def _body(**kind: Any) -> bytes:
    return pb.Body(**kind).SerializeToString()


def _request_proto(**fields: Any) -> pb.MatmulRequest:
    request = make_request().to_proto()
    for name, value in fields.items():
        setattr(request, name, value)
    return request


def _grouped_proto(further: int) -> pb.MatmulRequest:
    request = make_request().to_proto()
    request.group.extend(f"l{i}" for i in range(further))
    return request


def _reply_proto(**fields: Any) -> pb.MatmulReply:
    signed = sign_receipt(
        UsageReceipt(
            provider=PROVIDER,
            client=CLIENT,
            request_id=b"i" * 16,
            request_digest=b"d" * 32,
            reply_digest=sha256(b""),
            macs=1,
            price_per_gmac=1,
            completed_at_ms=1,
        ),
        PROVIDER_KEY,
    )
    reply = MatmulReply(
        request_id=b"i" * 16, request_digest=b"d" * 32, payload_sha256=sha256(b""), payload_length=0, receipt=signed
    ).to_proto()
    for name, value in fields.items():
        if isinstance(value, pb.Error):
            reply.error.CopyFrom(value)
        else:
            setattr(reply, name, value)
    return reply


class TestDecodeRefusals:
    @pytest.mark.parametrize(
        "data",
        [
            pytest.param(b"", id="empty body"),
            pytest.param(b"\xff\xff", id="garbage"),
            pytest.param(_body(request=_request_proto(nonce=b"n" * 15)), id="short nonce"),
            pytest.param(_body(request=_request_proto(payload_sha256=b"")), id="no digest"),
            pytest.param(_body(reply=_reply_proto(status=pb.STATUS_UNSPECIFIED)), id="status unspecified"),
            pytest.param(_body(reply=_reply_proto(error=pb.Error(code=pb.ERROR_CODE_BUSY))), id="ok with error"),
            pytest.param(
                _body(reply=_reply_proto(status=pb.STATUS_ERROR, error=pb.Error(code=pb.ERROR_CODE_UNSPECIFIED))),
                id="error without code",
            ),
            pytest.param(
                _body(reply=_reply_proto(status=pb.STATUS_ERROR, error=pb.Error(code=1, message="m" * 1025))),
                id="long error message",
            ),
            pytest.param(_body(receipt=pb.SignedReceipt(receipt=b"\x0a\x01", provider_signature=b"s" * 64)), id="bad receipt"),
            pytest.param(b"\x0a\x02\x2a\x01\xff", id="invalid utf-8 in layer"),
            pytest.param(_body(request=_grouped_proto(16)), id="a group of 17 layers"),
        ],
    )
    def test_refused_as_malformed(self, data: bytes) -> None:
        with pytest.raises(MalformedFrame):
            decode_body(data)

    def test_unknown_error_code_reads_as_internal(self) -> None:
        reply = _reply_proto(status=pb.STATUS_ERROR, error=pb.Error(code=77, message="new"))
        reply.ClearField("receipt")
        decoded = decode_body(_body(reply=reply))
        assert isinstance(decoded, MatmulReply) and decoded.error is not None
        assert decoded.error.code is ErrorCode.INTERNAL
        assert decoded.error.message == "error code 77: new"


class TestGeneratedCode:
    def test_matches_the_proto(self, tmp_path: pathlib.Path) -> None:
        protoc = pytest.importorskip("grpc_tools.protoc")
        from google.protobuf import descriptor_pb2

        out = tmp_path / "descriptor-set.pb"
        proto = "cipherswarm_matmul_v1.proto"
        assert protoc.main(["protoc", f"-I{PROTOCOL_DIR}", f"--descriptor_set_out={out}", proto]) == 0
        compiled = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file[0]
        for message in compiled.message_type:  # the generated module embeds no json names
            for field in message.field:
                field.ClearField("json_name")
        committed = descriptor_pb2.FileDescriptorProto()
        pb.DESCRIPTOR.CopyToProto(committed)
        assert committed == compiled, "regenerate the _pb2 files as protocol/README.md says"

    def test_imports_on_older_protobuf_runtimes(self) -> None:
        # Code generated by a newer protoc calls runtime_version.ValidateProtobufRuntimeVersion, which
        # refuses every runtime older than that protoc; the committed code must not.
        assert "runtime_version" not in (PROTOCOL_DIR / "cipherswarm_matmul_v1_pb2.py").read_text()

    def test_error_codes_agree(self) -> None:
        wire = {name.removeprefix("ERROR_CODE_"): number for name, number in pb.ErrorCode.items()}
        assert wire == {code.name: code.value for code in ErrorCode}
