"""Per-token quantization and the worst-case error of one remote layer, forward and backward."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from transformers.pytorch_utils import Conv1D

from cipherswarm.trainer import LayerSpec, LocalExecutor, Precision, dequantize_product, quantize_per_token
from cipherswarm.trainer.layers import RemoteContext, RemoteLinear


class TestQuantizePerToken:
    @given(tokens=st.integers(1, 6), features=st.integers(1, 40), n_bits=st.sampled_from([2, 4, 8, 12, 16]),
           seed=st.integers(0, 2**31 - 1), magnitude=st.floats(1e-6, 1e6))
    def test_range_and_error(self, tokens: int, features: int, n_bits: int, seed: int, magnitude: float) -> None:
        x = torch.randn(tokens, features, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * magnitude
        xq = quantize_per_token(x, n_bits)
        assert xq.q.dtype == (torch.int8 if n_bits <= 8 else torch.int16)  # the narrowest that holds n_bits
        assert int(xq.q.min()) >= -(1 << (n_bits - 1)) and int(xq.q.max()) <= (1 << (n_bits - 1)) - 1
        err = (xq.scale * xq.q + xq.offset - x).abs()
        # half a step, plus float64 rounding of the affine map
        assert bool((err <= xq.scale / 2 + 1e-12 * x.abs().amax(dim=1, keepdim=True)).all())

    def test_constant_rows_are_exact(self) -> None:
        x = torch.tensor([[3.25] * 5, [0.0] * 5, [-7.0] * 5])
        xq = quantize_per_token(x, 8)
        assert torch.equal(xq.scale * xq.q + xq.offset, x.double())

    def test_tokens_are_independent_of_their_batch(self) -> None:
        x = torch.randn(6, 32)
        whole = quantize_per_token(x, 8)
        for t in range(6):
            alone = quantize_per_token(x[t : t + 1], 8)
            assert torch.equal(alone.q, whole.q[t : t + 1]) and torch.equal(alone.scale, whole.scale[t : t + 1])

    def test_non_finite_is_refused(self) -> None:
        with pytest.raises(ValueError, match="not finite"):
            quantize_per_token(torch.tensor([[1.0, float("nan")]]), 8)


def _remote(base: nn.Module, n_bits: int, weight_bits: int = 8) -> RemoteLinear:
    base.requires_grad_(False)
    ctx = RemoteContext(precision=Precision(n_bits, n_bits, weight_bits))
    layer = RemoteLinear(base, "layer", ctx)
    spec = LayerSpec("layer", layer.quantized, ctx.precision, backward=True)
    ctx.executor = LocalExecutor({"layer": spec}, backend="clear", verify=False)
    return layer


@pytest.mark.parametrize(("n_bits", "weight_bits"), [(8, 8), (16, 8), (8, 12), (14, 16)])
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_layer_error_within_worst_case_bound(kind: str, n_bits: int, weight_bits: int) -> None:
    """|x^ W^ - x W| <= (s_t/2) sum_j |W_jk| + (c_k/2) sum_j |x_tj| + d s_t c_k / 4, for every t, k.

    s_t is token t's activation step, c_k column k's weight step (rounding errors of at most half a
    step each). Backward, with g' = g * c folded in: |error| <= (s'_t/2) sum_k |Wq_jk| + (1/2) sum_k |g'_tk|.
    """
    torch.manual_seed(0)
    d_in, d_out = 48, 24
    base = nn.Linear(d_in, d_out) if kind == "linear" else Conv1D(d_out, d_in)
    nn.init.normal_(base.weight, std=0.2)
    layer = _remote(base, n_bits, weight_bits)
    w = base.weight.detach().double()
    w = w if kind == "conv1d" else w.t()  # d_in, d_out
    x = (torch.randn(2, 5, d_in) * 3).requires_grad_(True)

    y = layer(x)
    ref = base(x.detach())
    flat = x.detach().reshape(-1, d_in).double()
    s = quantize_per_token(flat, n_bits).scale
    c = layer.quantized.scale.double()
    bound = s / 2 * w.abs().sum(0) + c / 2 * flat.abs().sum(1, keepdim=True) + d_in * s * c / 4
    assert bool(((y - ref).reshape(-1, d_out).double().abs() <= bound + 1e-5).all())

    g = torch.randn(2, 5, d_out)
    (gx,) = torch.autograd.grad(y, x, g)
    gflat = g.reshape(-1, d_out).double() * c
    s_g = quantize_per_token(gflat, n_bits).scale
    wq = layer.quantized.q.double()
    bound_g = s_g / 2 * wq.abs().sum(1) + 0.5 * gflat.abs().sum(1, keepdim=True)
    exact_gx = g.reshape(-1, d_out).double() @ w.t()
    assert bool(((gx.reshape(-1, d_in).double() - exact_gx).abs() <= bound_g + 1e-5).all())


def test_bias_and_leading_axes_are_kept() -> None:
    base = nn.Linear(16, 8)
    layer = _remote(base, 16)
    x = torch.randn(3, 2, 4, 16)
    y = layer(x)
    assert y.shape == (3, 2, 4, 8) and y.dtype == x.dtype
    torch.testing.assert_close(y, base(x), atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("n_bits", [2, 8, 16])
def test_the_cpu_kernel_is_the_torch_reference_bit_for_bit(dtype: torch.dtype, n_bits: int) -> None:
    """The fused CPU kernel computes the same float64 operations in the same order as torch's passes
    (which other devices run): the same integers, scales and offsets. Dequantization agrees to the
    last bit of a float64 (torch may fuse the zero-point term's multiply-add; the kernel does not)."""
    from cipherswarm.trainer.quantization import _quantize_kernel, _quantize_torch

    gen = torch.Generator().manual_seed(n_bits)
    for column_scale in (None, torch.rand(300, dtype=torch.float64, generator=gen) + 0.5):
        x = (torch.randn(70, 300, generator=gen) * 3).to(dtype)
        x[5] = 1.25  # a constant row
        a, b = _quantize_kernel(x, n_bits, column_scale), _quantize_torch(x, n_bits, column_scale)
        assert a.q.dtype == b.q.dtype and torch.equal(a.q, b.q)
        assert torch.equal(a.scale, b.scale) and torch.equal(a.offset, b.offset)
    y = torch.randint(-2**40, 2**40, (70, 50), generator=gen)
    sums = torch.randint(-5000, 5000, (50,), generator=gen).double()
    for out_scale in (None, torch.rand(50, dtype=torch.float64, generator=gen)):
        ref = y.to(torch.float64).mul_(a.scale)
        ref.addr_(a.offset.view(-1), sums)
        ref = ref if out_scale is None else ref.mul_(out_scale)
        assert torch.allclose(dequantize_product(y, a, sums, out_scale), ref, rtol=4e-16, atol=0)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_activations_are_refused_by_the_kernel(bad: float) -> None:
    x = torch.randn(4, 16)
    x[2, 7] = bad
    with pytest.raises(ValueError, match="not finite"):
        quantize_per_token(x, 8)
