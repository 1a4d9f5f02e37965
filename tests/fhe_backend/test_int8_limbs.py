"""The int8-limb provider product: bit-identical to the float64 path, no int32 overflow, refusals,
and the self-check a GPU provider runs before serving (the GEMM itself is the CPU reference here)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from cipherswarm.fhe_backend import BackendUnavailable, InputRangeError, MatmulResult, get_backend
from cipherswarm.fhe_backend import int8_limbs
from cipherswarm.fhe_backend.evaluator import matmul
from cipherswarm.fhe_backend.int8_limbs import LIMB_BITS, MAX_CHUNK, cpu_int8_gemm, cuda_device, limb_products
from cipherswarm.fhe_backend.selfcheck import self_check
from cipherswarm.fhe_backend.kernels import join_limbs_switch, split_limbs
from cipherswarm.fhe_backend.params import Params

be = get_backend("rlwe")


def assert_same(got: MatmulResult, ref: MatmulResult) -> None:
    assert np.array_equal(got.b_words, ref.b_words)
    assert (got.a_words is None) == (ref.a_words is None)
    if ref.a_words is not None:
        assert np.array_equal(got.a_words, ref.a_words)


def with_log_q(params: Params, log_q: int) -> Params:
    """The same layer's parameters at a bigger modulus (delta scaled along, ring N=4096 so 64 bits
    stay secure), to reach every limb count and the top-limb wrap at log_q = 8 * limbs: words of
    log_q bits, so an upload that the parameters rounded is not rounded here."""
    up = log_q - params.log_q
    return dataclasses.replace(
        params, n=4096, log_q=log_q, in_bits=log_q, delta=params.delta << up,
        out_bits_a=params.out_bits_a and params.out_bits_a + up, out_bits_b=params.out_bits_b + up,
    )


def encrypted_pair(params: Params, w: torch.Tensor, tokens: int, transpose: bool, seed: int):
    sk = be.keygen(params, weights=w, transpose=transpose)
    gen = torch.Generator().manual_seed(seed)
    half = 1 << (params.x_bits - 1)
    x = torch.randint(-half, half, (tokens, w.shape[1] if transpose else w.shape[0]), generator=gen)
    return sk, x, be.encrypt(sk, x)


class TestBitIdentical:
    @pytest.mark.parametrize("profile", ["default", "shared-mask"])
    @pytest.mark.parametrize("transpose", [False, True])
    @pytest.mark.parametrize("d_in, d_out, tokens, bits, chunk", [
        (70, 37, 1500, 8, MAX_CHUNK),  # one GEMM per block, odd sizes
        (70, 37, 2100, 8, 24),  # three pieces, the last one short (70 = 2 * 24 + 22)
        (1, 5, 3, 16, MAX_CHUNK),  # a one-row contraction, 16-bit activations
        (130, 9, 1024, 4, 64),  # 130 = 2 * 64 + 2
    ])
    def test_matches_f64(self, monkeypatch: pytest.MonkeyPatch, profile: str, transpose: bool,
                         d_in: int, d_out: int, tokens: int, bits: int, chunk: int) -> None:
        monkeypatch.setattr(int8_limbs, "GEMM_CHUNK", chunk)
        gen = torch.Generator().manual_seed(d_in + tokens)
        w = torch.randint(-128, 128, (d_in, d_out), generator=gen, dtype=torch.int8)
        params = be.params_for(w, bits, transpose=transpose, profile=profile)
        sk, x, ct = encrypted_pair(params, w, tokens, transpose, seed=bits)
        got = matmul(ct, w, transpose=transpose, method="int8")
        assert_same(got, matmul(ct, w, transpose=transpose, method="f64"))
        assert torch.equal(be.decrypt(sk, got), x @ (w.long().T if transpose else w.long()))

    @pytest.mark.parametrize("profile", ["default", "shared-mask"])
    @pytest.mark.parametrize("log_q", [48, 52, 64])
    def test_wide_moduli(self, monkeypatch: pytest.MonkeyPatch, profile: str, log_q: int) -> None:
        """6, 7 and 8 limbs; at 48 and 64 the top limb can be +128 and is stored as -128."""
        monkeypatch.setattr(int8_limbs, "GEMM_CHUNK", 32)
        w = torch.randint(-128, 128, (40, 12), generator=torch.Generator().manual_seed(log_q), dtype=torch.int8)
        params = with_log_q(be.params_for(w, 8, profile=profile), log_q)
        sk, x, ct = encrypted_pair(params, w, 300, False, seed=log_q)
        got = matmul(ct, w, method="int8")
        assert_same(got, matmul(ct, w, method="f64"))
        assert torch.equal(be.decrypt(sk, got), x @ w.long())

    @pytest.mark.parametrize("log_q", [1, 7, 8, 9, 31, 32, 40, 55, 56, 63, 64])
    def test_limb_arithmetic_against_int64(self, log_q: int) -> None:
        """limb_products + join_limbs_switch on arbitrary words, extremes included, equals the
        wrapping int64 product mod 2^log_q (no rounding, so every bit counts)."""
        rng = np.random.default_rng(log_q)
        d, n, width = 19, 21, 6
        mask = (1 << log_q) - 1
        words = rng.integers(0, 1 << 64, (d, n), dtype=np.uint64) & np.uint64(mask)
        top = 1 << (log_q - 1)  # the centred extremes: -2^(log_q-1) and 2^(log_q-1) - 1
        words[0, :3] = [top, top - 1, 0]
        words = words.view(np.int64)
        left = rng.integers(-128, 128, (width, d), dtype=np.int8)
        left[0] = -128
        prods = limb_products([words], left, log_q, cpu_int8_gemm)
        out = np.empty((width, n), dtype=np.int64)
        join_limbs_switch(prods, int8_limbs.LIMB_BITS, log_q, log_q, out)
        ref = (torch.from_numpy(left).long() @ torch.from_numpy(words)).numpy()  # wraps mod 2^64
        assert np.array_equal(out.view(np.uint64), ref.view(np.uint64) & np.uint64(mask))


class TestNoOverflow:
    def test_chunk_is_the_largest_safe_multiple_of_four(self) -> None:
        int32_max = (1 << 31) - 1
        assert MAX_CHUNK % 4 == 0
        assert MAX_CHUNK * 128 * 128 <= int32_max < (MAX_CHUNK + 4) * 128 * 128

    def test_worst_case_at_the_largest_chunk(self) -> None:
        """Every limb -128 (word 0x7f7f...7f80 at log_q 64) times every weight -128: each GEMM term
        is +2^14, the maximum. One full chunk stays below 2^31; at 4 rows more the sum is 2^31,
        beyond int32: those rows go to a second GEMM and the int64 sum holds the total."""
        word = np.array([0x7F7F7F7F7F7F7F80], dtype=np.uint64).view(np.int64)[0]
        for d, pieces in ((MAX_CHUNK, [MAX_CHUNK]), (MAX_CHUNK + 4, [MAX_CHUNK, 4])):
            words = np.full((d, 4), word, dtype=np.int64)
            limbs = np.empty((8, 8, 4), dtype=np.int8)
            split_limbs(words[:8], 64, LIMB_BITS, limbs)
            assert (limbs == -128).all()
            left = np.full((3, d), -128, dtype=np.int8)
            calls = []

            def counted(a: np.ndarray, b: np.ndarray) -> np.ndarray:
                calls.append(a.shape[1])
                return cpu_int8_gemm(a, b)

            prods = limb_products([words], left, 64, counted)
            assert calls == pieces
            assert prods.shape == (8, 3, 4) and (prods == d * 128 * 128).all()
        assert (MAX_CHUNK + 4) * 128 * 128 == 1 << 31

    def test_reference_gemm_wraps_like_int32(self) -> None:
        """The CPU reference would show an overflow if a chunk were too long: it wraps as the GPU's
        int32 accumulators do, instead of widening."""
        a = np.full((1, MAX_CHUNK + 4), -128, dtype=np.int8)
        assert cpu_int8_gemm(a, a.T.copy())[0, 0] == -(1 << 31)

    def test_chunk_above_the_bound_refused(self, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setattr(int8_limbs, "GEMM_CHUNK", MAX_CHUNK + 1)
        with pytest.raises(ValueError, match="overflow"):
            limb_products([np.zeros((2, 2), dtype=np.int64)], np.zeros((1, 2), dtype=np.int8), 8, cpu_int8_gemm)


class TestRefusals:
    @pytest.mark.parametrize("bad", [128, -129])
    def test_weights_outside_int8(self, bad: int) -> None:
        w = torch.randint(-128, 128, (16, 8), generator=torch.Generator().manual_seed(1))
        w[3, 2] = bad
        params = be.params_for(w, 8)
        sk, x, ct = encrypted_pair(params, w, 5, False, seed=1)
        with pytest.raises(InputRangeError, match=r"\[-128, 127\]"):
            matmul(ct, w, method="int8")
        assert torch.equal(be.decrypt(sk, matmul(ct, w, method="f64")), x @ w)

    def test_unknown_method(self) -> None:
        w = torch.ones((4, 4), dtype=torch.int8)
        ct = encrypted_pair(be.params_for(w, 8), w, 2, False, seed=0)[2]
        with pytest.raises(ValueError, match="int8"):
            matmul(ct, w, method="int4")


def off_by_one(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = cpu_int8_gemm(a, b)
    out[-1, -1] += 1
    return out


def wrong_on_wide_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Right on the raw check's operands, wrong in one low bit of the encrypted product's GEMM."""
    out = cpu_int8_gemm(a, b)
    if b.shape[1] > 2000:
        out[0, 0] ^= 1
    return out


def raising(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    raise RuntimeError("CUBLAS_STATUS_NOT_SUPPORTED")


class TestSelfCheck:
    def test_reference_passes(self) -> None:
        assert self_check(cpu_int8_gemm) is None

    @pytest.mark.parametrize("gemm, why", [
        (off_by_one, "int8 GEMM differs"),
        (wrong_on_wide_products, "encrypted product (default profile, transpose=False) differs"),
        (raising, "RuntimeError: CUBLAS_STATUS_NOT_SUPPORTED"),
    ])
    def test_corrupted_gemm_caught(self, gemm, why: str) -> None:
        assert why in self_check(gemm)


@pytest.mark.gpu
class TestCuda:
    """Runs the cuBLAS path where cupy and a GPU exist; skipped cleanly elsewhere."""

    @pytest.fixture(autouse=True)
    def _needs_gpu(self) -> None:
        pytest.importorskip("cupy")
        try:
            cuda_device()
        except BackendUnavailable as exc:
            pytest.skip(str(exc))

    def test_self_check(self) -> None:
        assert self_check(int8_limbs.cuda_int8_gemm) is None

    @pytest.mark.parametrize("profile", ["default", "shared-mask"])
    def test_matches_f64(self, profile: str) -> None:
        w = torch.randint(-128, 128, (300, 123), generator=torch.Generator().manual_seed(3), dtype=torch.int8)
        params = be.params_for(w, 8, profile=profile)
        sk, x, ct = encrypted_pair(params, w, 2500, False, seed=3)
        got = matmul(ct, w, method="int8", gemm=int8_limbs.cuda_int8_gemm)
        assert_same(got, matmul(ct, w, method="f64"))
        assert torch.equal(be.decrypt(sk, got), x @ w.long())
