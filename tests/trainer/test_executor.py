"""LocalExecutor on its own: exact products both ways, checked replies, costs, cleared keys."""

from __future__ import annotations

import pytest
import torch

from cipherswarm.fhe_backend.errors import VerificationFailed
from cipherswarm.fhe_backend.quant import Precision, quantize_weight
from cipherswarm.trainer import ExecutorStatistics, LayerSpec, LocalExecutor, LoopbackProvider, MatmulExecutor, NotCompiledError


def _specs(n_bits: int = 8) -> dict[str, LayerSpec]:
    g = torch.Generator().manual_seed(0)
    p = Precision.of(n_bits)
    return {
        "fwd_only": LayerSpec("fwd_only", quantize_weight(torch.randn(24, 40, generator=g), p.weight_bits), p, backward=False),
        "both": LayerSpec("both", quantize_weight(torch.randn(40, 16, generator=g), p.weight_bits), p, backward=True),
    }


def _ints(rows: int, cols: int, n_bits: int) -> torch.Tensor:
    return torch.randint(-(1 << (n_bits - 1)), 1 << (n_bits - 1), (rows, cols), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize(("backend", "profile"), [("rlwe", "default"), ("rlwe", "shared-mask"), ("clear", "default")])
@pytest.mark.parametrize("wire", [False, True])
def test_products_are_exact(backend: str, profile: str, wire: bool) -> None:
    specs = _specs()
    ex = LocalExecutor(specs, backend=backend, profile=profile, wire=wire)
    assert isinstance(ex, MatmulExecutor)
    w = specs["both"].weight.q.to(torch.int64)
    x, g = _ints(5, 40, 8), _ints(5, 16, 8)
    assert torch.equal(ex.matmul("both", x, transpose=False), x @ w)
    assert torch.equal(ex.matmul("both", g, transpose=True), g @ w.t())
    x2 = _ints(3, 24, 8)
    assert torch.equal(ex.matmul("fwd_only", x2, transpose=False), x2 @ specs["fwd_only"].weight.q.to(torch.int64))


def test_no_keys_for_a_skipped_backward() -> None:
    ex = LocalExecutor(_specs(), backend="clear")
    assert ("fwd_only", True) not in ex.params and ("both", True) in ex.params
    with pytest.raises(NotCompiledError, match="no keys were made"):
        ex.matmul("fwd_only", _ints(2, 40, 8), transpose=True)


class _TamperingProvider(LoopbackProvider):
    """Flips the top bit of one word of B'': one product value decrypts to something else."""

    def matmul(self, layer_key, ct, *, transpose):
        out = super().matmul(layer_key, ct, transpose=transpose)
        out.b_words[0, 0, 0] ^= 1 << (out.params.out_bits_b - 1)
        return out


def test_a_wrong_reply_is_caught() -> None:
    specs = _specs()
    provider = _TamperingProvider({k: s.plain for k, s in specs.items()})
    ex = LocalExecutor(specs, provider=provider)
    with pytest.raises(VerificationFailed, match="layer 'both'") as info:
        ex.matmul("both", _ints(4, 40, 8), transpose=False)
    assert info.value.bad_rows == 1


def test_statistics_count_every_call() -> None:
    ex = LocalExecutor(_specs())
    before = ex.statistics()
    ex.matmul("both", _ints(4, 40, 8), transpose=False)
    ex.matmul("both", _ints(4, 16, 8), transpose=True)
    step = ex.statistics() - before
    assert step.calls == 2 and step.bytes_sent > 0 and step.bytes_received > 0
    assert step.encrypt_s > 0 and step.decrypt_s > 0 and step.verify_s > 0 and step.provider_s > 0
    assert step.crypto_s == pytest.approx(step.encrypt_s + step.decrypt_s + step.verify_s + step.wire_s)
    assert ExecutorStatistics.of(object()) == ExecutorStatistics()  # executors without statistics()


def test_sixteen_bit_inputs_and_range() -> None:
    ex = LocalExecutor(_specs(16), backend="rlwe")
    x = _ints(3, 40, 16)
    assert torch.equal(ex.matmul("both", x, transpose=False), x @ _specs(16)["both"].weight.q.to(torch.int64))
    with pytest.raises(ValueError, match="activations must lie in"):
        LocalExecutor(_specs(8), backend="clear").matmul("both", x, transpose=False)
