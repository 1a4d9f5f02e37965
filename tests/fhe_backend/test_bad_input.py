"""Bad input never yields a silently wrong answer: it raises a typed error with a clear message."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cipherswarm.fhe_backend import (
    Ciphertext,
    FheError,
    InputRangeError,
    InvalidCiphertext,
    KeyMismatch,
    MatmulResult,
    ShapeMismatch,
    get_backend,
)

be = get_backend("rlwe")
W = torch.randint(-127, 128, (24, 8))
PARAMS = be.params_for(W, 8)
SK = be.keygen(PARAMS)
X = torch.randint(-128, 128, (5, 24))
CT = be.encrypt(SK, X)
CT_BYTES = CT.to_bytes()
OUT_BYTES = be.matmul(CT, W).to_bytes()


class TestInputs:
    @pytest.mark.parametrize(
        "x, err, match",
        [
            (X.float(), ShapeMismatch, "integer"),
            (X[0], ShapeMismatch, "2-D"),
            (torch.empty(0, 24, dtype=torch.long), ShapeMismatch, "non-empty"),
            (X + 200, InputRangeError, "x_bits=8"),
            (X.bool(), ShapeMismatch, "integer"),
        ],
    )
    def test_bad_activations(self, x, err, match) -> None:
        with pytest.raises(err, match=match):
            be.encrypt(SK, x)

    def test_wrong_contraction(self) -> None:
        with pytest.raises(ShapeMismatch, match="contract over"):
            be.matmul(CT, torch.randint(-5, 5, (23, 8)))
        with pytest.raises(ShapeMismatch, match="contract over"):
            be.matmul(CT, W, transpose=True)

    def test_float_weights(self) -> None:
        with pytest.raises(ShapeMismatch, match="integer"):
            be.matmul(CT, W.float())

    def test_params_of_another_layer(self) -> None:
        other = be.keygen(be.params_for(torch.randint(-127, 128, (24, 8)) * 0 + 1, 8))
        out = be.matmul(CT, W)
        with pytest.raises(KeyMismatch):
            be.decrypt(other, out)


class TestBytes:
    @pytest.mark.parametrize("cut", [0, 3, 40, len(CT_BYTES) // 2, len(CT_BYTES) - 1])
    def test_truncated_ciphertext(self, cut: int) -> None:
        with pytest.raises(InvalidCiphertext):
            Ciphertext.from_bytes(CT_BYTES[:cut])

    @pytest.mark.parametrize("cut", [0, 10, len(OUT_BYTES) - 1])
    def test_truncated_result(self, cut: int) -> None:
        with pytest.raises(InvalidCiphertext):
            MatmulResult.from_bytes(OUT_BYTES[:cut])

    def test_extra_bytes(self) -> None:
        with pytest.raises(InvalidCiphertext):
            Ciphertext.from_bytes(CT_BYTES + b"\0")

    def test_swapped_kinds(self) -> None:
        with pytest.raises(InvalidCiphertext, match="magic"):
            MatmulResult.from_bytes(CT_BYTES)
        with pytest.raises(InvalidCiphertext, match="magic"):
            Ciphertext.from_bytes(OUT_BYTES)

    def test_high_bits_set(self) -> None:
        """log_q is not a multiple of 8 here, so the top byte of a word has bits that must stay 0."""
        assert PARAMS.log_q % 8
        tampered = bytearray(CT_BYTES)
        tampered[len(CT_BYTES) - 1] |= 0x80
        with pytest.raises(InvalidCiphertext, match="exceeds"):
            Ciphertext.from_bytes(bytes(tampered))

    def test_a_rounded_upload_is_read_only_in_its_own_form(self) -> None:
        """A shared-mask upload is rounded and bit-packed (magic CSX3, 12 parameters): its header
        relabelled as the 11-parameter form, or a 12th parameter equal to log_q (a second encoding
        of unrounded parameters), are refused as typed errors (set padding bits: test_packing)."""
        params = be.params_for(W, 8, profile="shared-mask")
        data = be.encrypt(be.keygen(params, weights=W), X).to_bytes()
        assert params.rounded and data[:4] == b"CSX3" and Ciphertext.from_bytes(data).params == params
        with pytest.raises(InvalidCiphertext):
            Ciphertext.from_bytes(b"CSX2" + data[4:])
        same = bytearray(data)
        same[4 + 8 * 11 : 4 + 8 * 12] = params.log_q.to_bytes(8, "little")
        with pytest.raises(InvalidCiphertext, match="11 fields"):
            Ciphertext.from_bytes(bytes(same))

    @settings(max_examples=200)
    @given(pos=st.integers(0, len(CT_BYTES) - 1), byte=st.integers(0, 255))
    def test_mutated_bytes_typed_or_valid(self, pos: int, byte: int) -> None:
        data = bytearray(CT_BYTES)
        data[pos] = byte
        try:
            ct = Ciphertext.from_bytes(bytes(data))
            out = be.matmul(ct, W)  # a parsed ciphertext is well-formed: the provider runs or refuses
        except FheError:
            return
        assert out.d_out == 8

    @settings(max_examples=200)
    @given(data=st.binary(max_size=300))
    def test_random_bytes(self, data: bytes) -> None:
        for cls in (Ciphertext, MatmulResult):
            with pytest.raises(InvalidCiphertext):
                cls.from_bytes(data)
