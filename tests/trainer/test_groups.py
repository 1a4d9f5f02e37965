"""Layers that read the same input are one call: found in the trace, exact, and cheaper on the wire."""

from __future__ import annotations

import pytest
import torch
from trainer_factory import GPT2, LLAMA, lora_grads, make_trainer, token_data

from cipherswarm.node.weights import group_members
from cipherswarm.trainer import ExecutorStatistics
from cipherswarm.trainer.executor import LayerSpec, LocalExecutor
from cipherswarm.trainer.layers import Call, find_groups

QKV = "model.layers.1.self_attn.q_proj+model.layers.1.self_attn.k_proj+model.layers.1.self_attn.v_proj"


class TestFindGroups:
    def test_runs_of_one_input(self) -> None:
        trace = [Call("q", False, False), Call("k", False, True), Call("v", False, True), Call("o", True, False),
                 Call("gate", True, False), Call("up", True, True), Call("down", True, False)]
        assert find_groups(trace) == [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]]

    def test_a_layer_called_twice_on_one_input_is_not_its_own_group(self) -> None:
        assert find_groups([Call("a", True, False), Call("a", True, True), Call("b", True, True)]) == [["a"], ["b"]]

    def test_a_layer_in_two_different_runs_stays_alone(self) -> None:
        """Shared weights read with two different partners: no group could serve both places."""
        trace = [Call("a", True, False), Call("b", True, True), Call("a", True, False), Call("c", True, True)]
        assert find_groups(trace) == [["a"], ["b"], ["c"]]

    def test_the_same_run_again_is_one_group(self) -> None:
        trace = [Call("a", True, False), Call("b", True, True)] * 2
        assert find_groups(trace) == [["a", "b"]]


def _pair(arch=LLAMA, grouped: bool = True):
    trainer = make_trainer(arch)
    trainer.compile(token_data(1, 8), group_layers=grouped)
    return trainer


def test_the_trace_groups_qkv_and_gate_up_only() -> None:
    specs = _pair().layer_specs()
    assert QKV in specs
    assert "model.layers.0.mlp.gate_proj+model.layers.0.mlp.up_proj" in specs
    assert sorted(len(group_members(k)) for k in specs) == [1, 1, 1, 1, 2, 2, 3, 3]
    assert all(len(group_members(k)) == 1 for k in _pair(GPT2).layer_specs())  # c_attn is one layer already


def test_a_grouped_call_is_exact_and_equals_the_separate_calls() -> None:
    """Encrypted (RLWE, Freivalds-checked): forward, the members' products side by side; backward,
    the sum of theirs, each from one ciphertext."""
    trainer = _pair()
    spec = trainer.layer_specs()[QKV]
    members = {k: trainer._layers[k] for k in group_members(QKV)}
    alone = LocalExecutor({k: LayerSpec(k, m.quantized, spec.precision, True) for k, m in members.items()})
    grouped = LocalExecutor({QKV: spec})
    g = torch.Generator().manual_seed(5)
    x = torch.randint(-2**13, 2**13, (40, 64), generator=g, dtype=torch.int16)
    y = grouped.matmul(QKV, x, transpose=False)
    assert torch.equal(y, torch.cat([alone.matmul(k, x, transpose=False) for k in members], dim=1))
    assert torch.equal(y, x.long() @ spec.weight.q.long())
    widths = [m.out_features for m in members.values()]
    grad = torch.randint(-127, 128, (40, sum(widths)), generator=g, dtype=torch.int8)
    back = grouped.matmul(QKV, grad, transpose=True)
    assert torch.equal(back, sum(alone.matmul(k, part, transpose=True) for k, part in zip(members, grad.split(widths, dim=1))))
    assert grouped.statistics().calls == 2 and alone.statistics().calls == 6


def test_grouped_training_forward_is_bit_identical_and_backward_close() -> None:
    """Forward, a token's activations quantize the same whatever layer reads them: logits equal bit
    for bit. Backward, each token's gradient is quantized once over q|k|v (not per layer): LoRA
    gradients agree to the gradient grid's resolution."""
    batch = token_data(2, 8)
    grouped, alone = _pair(), _pair(grouped=False)
    assert len(alone.layer_specs()) == 14 and len(grouped.layer_specs()) == 8
    results = []
    for trainer in (grouped, alone):
        with trainer.fhe_mode("execute"):
            out = trainer.model(input_ids=batch, labels=batch)
            out.loss.backward()
        results.append((out.logits.detach(), lora_grads(trainer.model), ExecutorStatistics.of(trainer._local["execute"])))
    (logits_g, grads_g, stats_g), (logits_a, grads_a, stats_a) = results
    assert torch.equal(logits_g, logits_a)
    for name, grad in grads_a.items():
        assert float((grads_g[name] - grad).norm() / grad.norm()) < 0.02, name
    # one upload per group forward, one download per group backward
    assert stats_g.calls < stats_a.calls and stats_g.bytes_sent < stats_a.bytes_sent
    assert stats_g.bytes_received < stats_a.bytes_received


def test_a_member_called_on_another_input_gets_its_own_product() -> None:
    """A forward that runs otherwise than the traced one (k on a different tensor) stays exact."""
    trainer = _pair()
    q, k, _ = (trainer._layers[key] for key in group_members(QKV))
    x = torch.randn(3, 64)
    with trainer.fhe_mode("simulate"):
        first = q(x)
        other = k(x.clone())
        same_again = q(x)
    with torch.no_grad():
        assert torch.equal(first, same_again)
        assert torch.allclose(other, k.original(x), atol=0.05 * float(k.original(x).abs().max()))
    assert q.group._local.pending is not None  # q's second product waits for k and v; nothing else is kept
