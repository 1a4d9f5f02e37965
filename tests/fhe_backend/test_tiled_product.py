"""The provider's product in tiles: bit-identical to one product over the whole layer, whatever the
tile sizes, and its working memory within the documented scratch bound (evaluator.SCRATCH_BYTES)."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from cipherswarm.fhe_backend import MatmulResult, PlainWeights, get_backend
from cipherswarm.fhe_backend.evaluator import SCRATCH_BYTES, matmul, plan_tiles, provider_limb_bits
from cipherswarm.fhe_backend.params import SHARED_MASK
from cipherswarm.fhe_backend.ring import limb_count

be = get_backend("rlwe")
#: one product over the whole layer: a budget no test layer comes near
WHOLE = 1 << 40


def assert_same(got: MatmulResult, ref: MatmulResult) -> None:
    assert np.array_equal(got.b_words, ref.b_words)
    assert (got.a_words is None) == (ref.a_words is None)
    if ref.a_words is not None:
        assert np.array_equal(got.a_words, ref.a_words)


def tiles_of(ct, w: torch.Tensor, transpose: bool, method: str, scratch_bytes: int):
    """The tiles matmul plans for this call (the same arguments it passes)."""
    p = ct.params
    pw = PlainWeights(w)
    lb = {"f64": provider_limb_bits(pw.stats(transpose).l1), "int8": 8, "i64": 64}[method]
    shared = p.profile == SHARED_MASK
    contraction, width = (w.shape[1], w.shape[0]) if transpose else tuple(w.shape)
    return plan_tiles(method, contraction=contraction, width=width, n=p.n, words=1 if shared else 2,
                      limbs=limb_count(p.log_q, lb), mask_rows=not shared, scratch_bytes=scratch_bytes)


def encrypted(w: torch.Tensor, tokens: int, transpose: bool, profile: str, seed: int):
    params = be.params_for(w, 8, transpose=transpose, profile=profile)
    sk = be.keygen(params, weights=w, transpose=transpose)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(-128, 128, (tokens, w.shape[1] if transpose else w.shape[0]), generator=gen, dtype=torch.int8)
    return sk, x, be.encrypt(sk, x)


class TestBitIdentical:
    @pytest.mark.parametrize("profile", ["default", "shared-mask"])
    @pytest.mark.parametrize("transpose", [False, True])
    @pytest.mark.parametrize("method", ["f64", "int8", "i64"])
    def test_small_tiles_equal_one_product(self, profile: str, transpose: bool, method: str) -> None:
        """Budgets that cut both axes into uneven tiles (down to one row or column per tile) give the
        words of one product over the whole layer, and decrypt to the exact product."""
        gen = torch.Generator().manual_seed(7)
        w = torch.randint(-128, 128, (45, 29), generator=gen, dtype=torch.int8)
        w[0, 0], w[-1, -1] = -128, 127
        sk, x, ct = encrypted(w, 2100, transpose, profile, seed=3)  # two blocks, the second one short
        ref = matmul(ct, w, transpose=transpose, method=method, scratch_bytes=WHOLE)
        whole = tiles_of(ct, w, transpose, method, WHOLE)
        assert (whole.rows, whole.cols) == ((29, 45) if transpose else (45, 29))
        budgets = (whole.scratch // 2, whole.scratch // 4, 400_000, 1)
        tiles = [tiles_of(ct, w, transpose, method, budget) for budget in budgets]
        assert any(t.rows < whole.rows and t.cols < whole.cols for t in tiles)
        assert (tiles[-1].rows, tiles[-1].cols) == (1, 1)
        for budget in budgets:
            assert_same(matmul(ct, w, transpose=transpose, method=method, scratch_bytes=budget), ref)
        assert torch.equal(be.decrypt(sk, ref), x.long() @ (w.long().T if transpose else w.long()))

    @pytest.mark.parametrize("method", ["f64", "int8"])
    def test_row_chunk_expands_its_own_mask_rows(self, method: str) -> None:
        """A contraction-row chunk (first_row > 0) expands the mask from its own offset in every tile."""
        gen = torch.Generator().manual_seed(11)
        w = torch.randint(-128, 128, (50, 20), generator=gen, dtype=torch.int8)
        sk, x, ct = encrypted(w, 300, False, "default", seed=5)
        part = ct.select_rows(13, 41, parts=2)
        ref = matmul(part, w[13:41], method=method, scratch_bytes=WHOLE)
        assert tiles_of(part, w[13:41], False, method, 300_000).rows < 28
        assert_same(matmul(part, w[13:41], method=method, scratch_bytes=300_000), ref)
        assert_same(ref, matmul(part, w[13:41], method="f64"))


def warm_up(method: str, profile: str, transpose: bool) -> None:
    """One small product of the same kind: numba loads its compiled kernels (Python allocations
    that tracemalloc would count) before a measured call."""
    w = torch.randint(-128, 128, (8, 6), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    _, _, ct = encrypted(w, 4, transpose, profile, seed=0)
    matmul(ct, w, transpose=transpose, method=method, scratch_bytes=1)


class TestScratchBound:
    """numpy reports its allocations to tracemalloc, and every buffer of the float64 path is numpy,
    so the traced peak of a call minus its output is the call's working memory. The layers are
    large enough that one product over the whole layer would need more than the bound."""

    @staticmethod
    def peak_beyond_output(ct, pw: PlainWeights, transpose: bool, method: str, budget: int) -> tuple[int, MatmulResult]:
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            out = matmul(ct, pw, transpose=transpose, method=method, scratch_bytes=budget)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        output = out.b_words.nbytes + (0 if out.a_words is None else out.a_words.nbytes)
        return peak - base - output, out

    @pytest.mark.parametrize("profile, transpose", [("default", False), ("default", True), ("shared-mask", False)])
    def test_default_bound_on_a_large_layer(self, profile: str, transpose: bool) -> None:
        gen = torch.Generator().manual_seed(1)
        pw = PlainWeights(torch.randint(-127, 128, (2048, 2560), generator=gen, dtype=torch.int8))
        _, _, ct = encrypted(pw.w, 64, transpose, profile, seed=2)
        p = ct.params
        words = 1 if profile == "shared-mask" else 2
        limbs = limb_count(p.log_q, provider_limb_bits(pw.stats(transpose).l1))
        untiled = 8 * words * limbs * p.n * sum(pw.w.shape)  # the limbs of all rows and all products
        assert untiled > SCRATCH_BYTES
        warm_up("f64", profile, transpose)
        scratch, out = self.peak_beyond_output(ct, pw, transpose, "f64", SCRATCH_BYTES)
        assert 0 < scratch <= SCRATCH_BYTES
        assert scratch <= tiles_of(ct, pw.w, transpose, "f64", SCRATCH_BYTES).scratch + (64 << 10)

    @pytest.mark.parametrize("profile", ["default", "shared-mask"])
    def test_int8_bound(self, profile: str) -> None:
        """The int8 path's host buffers (limbs, int64 sums; the CPU GEMM's int32 copies are torch's
        and not traced) stay within a small budget on a layer whose untiled sums alone exceed it."""
        budget = 12 << 20
        gen = torch.Generator().manual_seed(4)
        pw = PlainWeights(torch.randint(-128, 128, (256, 384), generator=gen, dtype=torch.int8))
        _, _, ct = encrypted(pw.w, 64, False, profile, seed=6)
        words = 1 if profile == "shared-mask" else 2
        assert 8 * words * limb_count(ct.params.log_q, 8) * ct.params.n * 384 > 2 * budget  # untiled int64 sums
        warm_up("int8", profile, False)
        scratch, out = self.peak_beyond_output(ct, pw, False, "int8", budget)
        assert 0 < scratch <= budget
        assert_same(out, matmul(ct, pw))

    def test_no_wider_copy_of_the_weights_is_kept(self) -> None:
        """After products in both directions and by every CPU method, the weights are still the int8
        tensor alone: nothing on the object is float64, int64 or layer-sized besides it."""
        gen = torch.Generator().manual_seed(9)
        pw = PlainWeights(torch.randint(-127, 128, (96, 80), generator=gen, dtype=torch.int8))
        for transpose in (False, True):
            _, _, ct = encrypted(pw.w, 40, transpose, "default", seed=8)
            for method in ("f64", "i64", "int8"):
                matmul(ct, pw, transpose=transpose, method=method)
        tensors = [v for v in vars(pw).values() if isinstance(v, (torch.Tensor, np.ndarray))]
        assert len(tensors) == 1 and tensors[0] is pw.w and pw.w.dtype == torch.int8
        assert set(pw._stats) == {False, True}
