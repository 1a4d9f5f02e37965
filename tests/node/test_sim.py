"""The swarm simulator: engine timing, the workload against the real trainer, failures, the CLI.

Workloads come from the trainer's plan of the model (``traced_model``), as in ``cipherswarm
estimate``; tests/trainer/test_workload.py checks the plan against a real trainer's calls.
"""

from __future__ import annotations

from dataclasses import replace
from functools import cache

import pytest
import torch

from cipherswarm.cli.main import main
from cipherswarm.fhe_backend.params import WeightStats, choose_params
from cipherswarm.fhe_backend.shared_mask import SharedMaskKey
from cipherswarm.node.engine import ENGINE
from cipherswarm.node.client.config import ClientConfig
from cipherswarm.node.sim import ClientSpec, LayerGroup, LinearLayer, ModelShape, ProviderSpec, Swarm, Workload, simulate
from cipherswarm.node.sim.engine import FifoServers, Resource, Simulator
from cipherswarm.node.sim.policy import ChunkFailed
from cipherswarm.node.sim.report import render
from cipherswarm.node.weights import load_model
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, build
from cipherswarm.trainer import StepRecord
from cipherswarm.trainer.workload import LLAMA_3_8B, traced_model


def _finish_times(shared: bool) -> list[float]:
    """Two 1-core-second jobs and one 2-core-second job arriving at t=0, 0, 1 on one core."""
    sim, done = Simulator(), []
    core = Resource("cpu", 1.0)
    fifo = FifoServers(sim, 1)

    def job(work: float) -> None:
        if shared:
            sim.flows.start(work, (core,), lambda: done.append(sim.now))
        else:
            fifo.run(lambda finish: sim.flows.start(work, (core,), finish), lambda: done.append(sim.now))

    sim.after(0.0, lambda: job(1.0))
    sim.after(0.0, lambda: job(1.0))
    sim.after(1.0, lambda: job(2.0))
    sim.run()
    return sorted(done)


def test_fifo_serves_in_order() -> None:
    assert _finish_times(shared=False) == pytest.approx([1.0, 2.0, 4.0])


def test_processor_sharing_divides_the_core() -> None:
    # 0-1 s: two jobs at 1/2 each (0.5 left each); 1-2.5 s: three at 1/3, so the first two end at
    # 2.5 and the third has done 0.5 of its 2; its last 1.5 alone at full speed end at 4.0.
    assert _finish_times(shared=True) == pytest.approx([2.5, 2.5, 4.0])


def test_caps_and_two_resource_flows_are_max_min_fair() -> None:
    sim, done = Simulator(), {}
    up, down_a, down_b = Resource("up", 10.0), Resource("a", 2.0), Resource("b", 100.0)
    sim.flows.start(20.0, (up, down_a), lambda: done.setdefault("a", sim.now))  # limited to 2/s by its downlink
    sim.flows.start(40.0, (up, down_b), lambda: done.setdefault("b", sim.now))  # gets the other 8/s, then 10/s
    sim.flows.start(3.0, (), lambda: done.setdefault("capped", sim.now), cap=1.5)  # no resource: its cap alone
    sim.run()
    assert done["capped"] == pytest.approx(2.0)
    assert done["b"] == pytest.approx(5.0)
    assert done["a"] == pytest.approx(10.0)


@cache
def _bundled() -> ModelShape:
    """The bundled tiny LLaMA as ``cipherswarm estimate --model tiny`` plans it (default skip and LoRA)."""
    return traced_model(BUNDLED_MODEL)


@cache
def _llama_8b_shape() -> ModelShape:
    return traced_model(LLAMA_3_8B, name="llama-3-8b")


@pytest.fixture(scope="module")
def trainer_step() -> tuple[StepRecord, FinetuneConfig]:
    """One real training step of the bundled model in fhe='execute' and its config."""
    torch.manual_seed(0)
    config = FinetuneConfig(steps=1, eval_batches=1)
    trainer, batches, _ = build(config)
    trainer.train(batches, fhe="execute", max_steps=1, progress=False)
    return trainer.step_records[0], config


def test_workload_matches_what_the_trainer_sends(trainer_step: tuple[StepRecord, FinetuneConfig]) -> None:
    record, config = trainer_step
    tokens = config.batch_size * config.seq_len
    shape = traced_model(BUNDLED_MODEL, n_layers_to_skip_for_backprop=config.n_layers_to_skip_for_backprop)
    work = Workload(shape, tokens=tokens, micro_batch_tokens=tokens, seq_len=config.seq_len, precision=config.precision,
                    profile=config.profile)
    calls = work.products(tokens)
    assert len(calls) == record.remote_calls
    assert sum(p.bytes_in for p in calls) == record.bytes_sent
    assert sum(p.bytes_out for p in calls) == record.bytes_received


LLAMA_BLOCK = [  # LLaMA-3-8B's config: hidden 4096, 32 heads and 8 KV heads of 128, intermediate 14336
    ("self_attn.q_proj", 4096, 4096), ("self_attn.k_proj", 4096, 1024), ("self_attn.v_proj", 4096, 1024),
    ("self_attn.o_proj", 4096, 4096), ("mlp.gate_proj", 4096, 14336), ("mlp.up_proj", 4096, 14336),
    ("mlp.down_proj", 14336, 4096),
]


def _llama_8b(tokens: int = 4096, **kw: object) -> Workload:
    return Workload(_llama_8b_shape(), tokens=tokens, micro_batch_tokens=tokens,
                    seq_len=128, **kw)  # type: ignore[arg-type]


def test_llama_layers_that_read_one_input_are_one_call_each_way() -> None:
    tokens = 4096
    work = _llama_8b(tokens)
    calls = work.products(tokens)
    forward = [p for p in calls if not p.transpose]
    backward = [p for p in calls if p.transpose]
    # q+k+v, o, gate+up, down: 4 calls per block (7 layers), 32 blocks
    assert len(forward) == 4 * 32
    assert [p.key for p in forward[:4]] == [
        "model.layers.0.self_attn.q_proj+model.layers.0.self_attn.k_proj+model.layers.0.self_attn.v_proj",
        "model.layers.0.self_attn.o_proj",
        "model.layers.0.mlp.gate_proj+model.layers.0.mlp.up_proj",
        "model.layers.0.mlp.down_proj",
    ]
    assert [m.key for m in forward[0].layer.members] == [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"]
    # forward: contraction d_in, width the members' summed d_out
    assert [(p.contraction, p.width) for p in forward[:4]] == [
        (4096, 4096 + 1024 + 1024), (4096, 4096), (4096, 2 * 14336), (14336, 4096)]
    # the input goes up once per group: a block uploads three 4096-wide inputs and one 14336-wide, not six and one
    assert sum(p.contraction for p in forward[:4]) == 3 * 4096 + 14336
    qkv = forward[0]
    assert tokens % qkv.params.n == 0  # whole blocks: no padding in the byte counts below
    assert qkv.bytes_in == tokens * 4096 * qkv.params.in_bytes
    assert qkv.bytes_out == tokens * 6144 * qkv.params.out_bytes
    # backward in reverse, one g @ W^T per group; block 0's q+k+v input needs no gradient (LoRA on q and v)
    assert len(backward) == 4 * 32 - 1
    assert backward[0].key == "model.layers.31.mlp.down_proj"
    assert [p.key for p in backward[-3:]] == [
        "model.layers.0.mlp.down_proj", "model.layers.0.mlp.gate_proj+model.layers.0.mlp.up_proj", "model.layers.0.self_attn.o_proj"]
    # contraction the summed d_out, width d_in: one download of the summed input gradients
    assert [(p.contraction, p.width) for p in backward[-3:]] == [(4096, 14336), (2 * 14336, 4096), (4096, 4096)]
    gate_up = backward[-2]
    assert tokens % gate_up.params.n == 0
    assert gate_up.bytes_out == tokens * 4096 * gate_up.params.out_bytes
    assert gate_up.bytes_in == tokens * 2 * 14336 * gate_up.params.in_bytes
    # grouping moves no MAC: the same layers, multiplied together
    per_block = sum(d_in * d_out for _, d_in, d_out in LLAMA_BLOCK)
    assert work.remote_macs(tokens, backward=False) == tokens * 32 * per_block
    block0_back = sum(d_in * d_out for name, d_in, d_out in LLAMA_BLOCK if name[-6:] not in ("q_proj", "k_proj", "v_proj"))
    assert work.remote_macs(tokens) == tokens * (2 * 32 * per_block - (per_block - block0_back))


def test_a_groups_parameters_are_those_of_its_concatenated_shape() -> None:
    """Config only: the Gaussian-column estimate of the group's own shape, each direction."""
    work = _llama_8b()
    forward = work.products(4096, backward=False)

    def one_layer(d_out: int) -> tuple:  # type: ignore[type-arg]
        """A plain layer of d_in 4096, called forward and backward."""
        w = LayerGroup((LinearLayer("w", 4096, d_out),))
        shape = ModelShape("m", ((w, False), (w, True)), hidden=4096, n_layers=1, vocab=1, attn_width=1, lora_params=0,
                           n_layers_to_skip_for_backprop=0)
        calls = Workload(shape, tokens=4096, micro_batch_tokens=4096, seq_len=128).products(4096)
        assert [(p.key, p.transpose) for p in calls] == [("w", False), ("w", True)]
        return calls[0], calls[1]

    fwd_alone, back_alone = one_layer(2 * 14336)
    _, back_gate = one_layer(14336)
    back = next(p for p in work.products(4096) if p.transpose and p.key == "model.layers.0.mlp.gate_proj+model.layers.0.mlp.up_proj")
    assert forward[2].params == fwd_alone.params
    assert back.params == back_alone.params
    assert back.params.w_l1 > back_gate.params.w_l1  # a backward contraction of 28672, not one member's 14336


def test_a_groups_parameters_come_from_its_real_concatenated_weights() -> None:
    """With weights, the parameters are chosen from the norms of [W_q | W_k | W_v] itself."""
    work = Workload(_bundled(), tokens=2048, micro_batch_tokens=2048, seq_len=128)
    weights = load_model(BUNDLED_MODEL, hold=False, weight_bits=work.precision.weight_bits)
    names = [f"model.layers.1.self_attn.{n}_proj" for n in "qkv"]
    q = torch.cat([weights.read(n).q for n in names], dim=1).to(torch.int64)
    assert q.shape == (128, 3 * 128)
    for transpose, norms_over in ((False, 0), (True, 1)):  # columns forward, rows of the concatenation backward
        stats = WeightStats(l1=int(q.abs().sum(norms_over).max()), l2sq=int((q * q).sum(norms_over).max()))
        expected = choose_params(stats, work.precision.x_bits(transpose), profile=work.profile)
        product = next(p for p in work.products(2048) if p.transpose == transpose and p.key == "+".join(names))
        assert product.params == expected


def test_client_memory_has_a_key_per_group_and_direction() -> None:
    work = _llama_8b(profile="default")  # a secret key per group and direction, no binding
    memory = work.client_memory()
    # summaries stay per layer: float32 scales and int32 sums both ways (node.weights.Layer.summary_size)
    assert memory["summaries"] == 32 * sum(4 * d_out + 4 * (d_out + d_in) for _, d_in, d_out in LLAMA_BLOCK)
    # keys: N int8 coefficients and N/2 complex128 per key, one per group (4 a block) and direction
    forward = {p.params.n for p in work.products(4096, backward=False)}
    backward = {p.params.n for p in work.products(4096) if p.transpose}
    assert len(forward) == len(backward) == 1
    assert memory["keys"] == 32 * 4 * (9 * forward.pop() + 9 * backward.pop())
    alone = tuple((LayerGroup((layer,)), transpose) for group, transpose in work.model.calls for layer in group.members)
    split = replace(work, model=replace(work.model, calls=alone))
    assert len(split.products(4096, backward=False)) == 7 * 32  # one layer a group: as before grouping
    per_layer = split.client_memory()
    assert per_layer["summaries"] == memory["summaries"] and per_layer["keys"] > memory["keys"]


def test_a_shared_mask_client_binds_its_keys_first_and_holds_the_bindings() -> None:
    """The shared-mask profile: the client binds a key per group and direction before its first
    call (N token slots through the layer), and holds each binding: the estimate counts both, by
    the sizes a real key of the bundled model has."""
    work, swarm = _tiny_swarm()
    work = replace(work, profile="default")  # the profile without bindings, to compare with
    shared = replace(work, profile="shared-mask")
    directions = {(p.key, p.transpose): p for p in shared.products(work.micro_batch_tokens)}
    assert shared.binding_macs() == sum(p.params.n * p.contraction * p.width for p in directions.values()) > 0
    assert work.binding_macs() == 0
    base, bound = simulate(work, swarm), simulate(shared, swarm)
    spec = swarm.client
    assert bound.tally.cpu_s["binding"] == pytest.approx(shared.binding_macs() * spec.plain_parallelism / spec.plain_macs_per_s)
    assert "binding" not in base.tally.cpu_s
    # a client with no room for bindings binds for each call instead, and holds only the seeds
    assert shared.kept_bindings(0) == set() and shared.kept_bindings(1 << 40) == set(directions)
    per_call = simulate(shared, swarm, ClientConfig(binding_budget=0))
    calls = sum(p.binding_macs for p in shared.products(work.micro_batch_tokens)) * len(shared.micro_batches)
    assert per_call.tally.cpu_s["binding"] == pytest.approx(calls * spec.plain_parallelism / spec.plain_macs_per_s)
    assert shared.client_memory(binding_budget=0)["keys"] == 32 * 2 * len(shared.model.groups)  # a key per group and direction
    bindings = sum(SharedMaskKey.binding_bytes(p.params, p.width) for p in directions.values())
    assert shared.client_memory(binding_budget=1 << 40)["keys"] == 32 * 2 * len(shared.model.groups) + bindings
    # the same uploads a call (the router may replicate fewer, its replies being smaller), smaller replies
    assert bound.tally.bytes_down < 0.6 * base.tally.bytes_down and bound.tally.bytes_up <= base.tally.bytes_up
    # a real key of one group, bound to its weights, is no larger than the estimate counts
    weights = load_model(BUNDLED_MODEL, hold=False, weight_bits=work.precision.weight_bits)
    product = next(p for p in directions.values() if "+" in p.key and not p.transpose)
    q = weights.resolve(product.key)
    w = torch.cat([weights.read(member.name).q for member in weights.members(q.name)], dim=1)
    key = ENGINE.keygen(product.params, weights=w)
    assert key.nbytes <= SharedMaskKey.bytes_for(product.params, product.contraction, product.width) <= 1.5 * key.nbytes


def test_gpt2_layers_are_each_alone() -> None:
    """GPT-2's c_attn already holds q, k and v: each of its four layers a block is its own call."""
    config = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "vocab_size": 50257}
    shape = traced_model(config, name="gpt2", n_layers_to_skip_for_backprop=0)  # LoRA on c_attn: peft's default
    work = Workload(shape, tokens=1024, micro_batch_tokens=1024, seq_len=128)
    forward = work.products(1024, backward=False)
    assert len(forward) == 4 * 12 and all("+" not in p.key for p in forward)
    assert [(p.key, p.contraction, p.width) for p in forward[:4]] == [
        ("transformer.h.0.attn.c_attn", 768, 3 * 768), ("transformer.h.0.attn.c_proj", 768, 768),
        ("transformer.h.0.mlp.c_fc", 768, 4 * 768), ("transformer.h.0.mlp.c_proj", 4 * 768, 768)]
    assert len(work.products(1024)) == 2 * 4 * 12 - 1  # block 0's c_attn input needs no gradient


def test_a_provider_holding_part_of_a_group_cannot_serve_it() -> None:
    work = Workload(_bundled(), tokens=2048, micro_batch_tokens=2048, seq_len=128)
    spec = ProviderSpec(macs_per_s=2e9, rtt_s=0.02, layers=("*.q_proj", "*.k_proj", "*.o_proj", "*mlp*"))  # no v_proj
    swarm = Swarm.uniform(2, spec, ClientSpec(up_bps=1e8, down_bps=1e8), seed=1)
    with pytest.raises(ChunkFailed, match=r"no provider holds model\.layers\.0\.self_attn\.q_proj\+model\.layers\.0\.self_attn\.k_"):
        simulate(work, swarm)


def _tiny_swarm(**provider: object) -> tuple[Workload, Swarm]:
    work = Workload(_bundled(), tokens=2048, micro_batch_tokens=2048, seq_len=128)
    spec = ProviderSpec(macs_per_s=2e9, rtt_s=0.02, **provider)  # type: ignore[arg-type]
    return work, Swarm.uniform(4, spec, ClientSpec(up_bps=1e8, down_bps=1e8), seed=1)


def test_failures_cause_retries_and_take_longer() -> None:
    work, healthy = _tiny_swarm()
    _, flaky = _tiny_swarm(fail_prob=0.05)
    base, worse = simulate(work, healthy), simulate(work, flaky)
    assert base.tally.retries == 0 and base.tally.timeouts == 0
    # a lost request is raced by a hedge after hedge_min_s, or retried elsewhere after its timeout
    assert worse.tally.hedges + worse.tally.retries > base.tally.hedges + base.tally.retries
    assert worse.tally.attempts > base.tally.attempts
    assert worse.wall_s > base.wall_s
    assert worse.tally.macs == base.tally.macs  # each chunk is paid once, whoever computed it


def test_churn_makes_providers_unreachable() -> None:
    work, healthy = _tiny_swarm()
    _, churning = _tiny_swarm(mean_up_s=4.0, mean_down_s=1.0)
    base, worse = simulate(work, healthy), simulate(work, churning)
    assert worse.tally.unreachable > 0 and worse.tally.retries > 0
    assert worse.wall_s > base.wall_s


def test_estimate_cli_prints_the_breakdown(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["estimate", "--model", "tiny", "--tokens", "4096", "--micro-batch-tokens", "2048", "--providers", "3"]) == 0
    out = capsys.readouterr().out
    for needle in ("assumptions:", "wall time", "tokens/s", "price", "client uplink", "client downlink",
                   "client CPU: encrypt+decrypt+verify+wire", "provider compute", "latency", "bottleneck:"):
        assert needle in out


# -- gradient accumulation: micro-batches of one optimizer step in flight at once ------------------


def _accumulating(tokens: int, ga: int, in_flight: int, **client: object) -> Workload:
    return Workload(_bundled(), tokens=tokens, micro_batch_tokens=2048, seq_len=128,  # no binding phase before the steps
                    gradient_accumulation_steps=ga, micro_batches_in_flight=in_flight, profile="default")


def _fast_swarm(**client: object) -> Swarm:
    """Six providers and 1 GB/s links everywhere: a call's chunk waits on its provider, not on the client's link."""
    spec = ProviderSpec(macs_per_s=2e9, rtt_s=0.02, up_bps=1e9, down_bps=1e9)
    return Swarm.uniform(6, spec, ClientSpec(up_bps=1e9, down_bps=1e9, **client), seed=1)  # type: ignore[arg-type]


def test_workload_groups_micro_batches_into_optimizer_steps() -> None:
    work = _accumulating(5 * 2048 + 1000, 2, 2)
    assert work.micro_batches == [2048] * 5 + [1000]
    assert work.optimizer_steps == [[2048, 2048], [2048, 2048], [2048, 1000]]
    assert _accumulating(5 * 2048, 2, 2).optimizer_steps == [[2048, 2048], [2048, 2048], [2048]]  # a short last step
    assert _accumulating(3 * 2048, 1, 2).optimizer_steps == [[2048], [2048], [2048]]
    assert (_accumulating(2048, 4, 8).in_flight, _accumulating(2048, 1, 2).in_flight) == (4, 1)
    for bad in ({"gradient_accumulation_steps": 0}, {"micro_batches_in_flight": 0}):
        with pytest.raises(ValueError, match="must be an integer >= 1"):
            replace(_accumulating(2048, 1, 1), **bad)  # type: ignore[arg-type]


def test_one_micro_batch_in_flight_is_the_sequential_run() -> None:
    """accumulation 2, one at a time: each step is exactly its two micro-batches run one after another."""
    tokens = 5 * 2048 + 1000
    sequential = simulate(_accumulating(tokens, 1, 2), _fast_swarm())  # one micro-batch a step: nothing overlaps
    grouped = simulate(_accumulating(tokens, 2, 1), _fast_swarm())
    assert len(sequential.step_s) == sequential.steps_total == 6
    assert len(grouped.step_s) == grouped.steps_total == 3
    pairs = [sum(sequential.step_s[i : i + 2]) for i in range(0, 6, 2)]
    assert grouped.step_s == pytest.approx(pairs, rel=1e-12, abs=0)
    assert grouped.wall_s == sequential.wall_s
    assert grouped.tally == sequential.tally


def test_two_micro_batches_in_flight_overlap_their_calls() -> None:
    """With the providers, not the client's link, bounding a call, two micro-batches at once nearly halve a step."""
    tokens = 4 * 2048
    one, two = (simulate(_accumulating(tokens, 2, k), _fast_swarm()) for k in (1, 2))
    assert len(one.step_s) == len(two.step_s) == 2
    for alone, overlapped in zip(one.step_s, two.step_s):
        assert overlapped < 0.8 * alone  # clearly faster ...
        assert overlapped >= 0.5 * alone  # ... and no better than perfect overlap
    assert 0.5 * one.wall_s <= two.wall_s < 0.8 * one.wall_s
    # the same work, whatever overlaps: every call, chunk, byte and MAC
    assert (two.tally.bytes_up, two.tally.bytes_down, two.tally.macs, two.tally.chunks) == (
        one.tally.bytes_up, one.tally.bytes_down, one.tally.macs, one.tally.chunks)
    assert two.tally.macs == sum(p.macs for t in _accumulating(tokens, 2, 2).micro_batches
                                 for p in _accumulating(tokens, 2, 2).products(t))
    # two at once: at most two calls' round trips at a time, so the latency the wall time holds is halved
    assert two.demand_s["latency (one round trip per call)"] == pytest.approx(one.demand_s["latency (one round trip per call)"] / 2)


def test_bytes_and_macs_do_not_depend_on_micro_batches_in_flight() -> None:
    """The same chunks whatever overlaps. Block chunks: with "auto" the router may spread a call's columns
    over more providers when others are busy with a concurrent call (more bytes, the same MACs)."""
    tokens = 4 * 2048 + 512
    runs = [simulate(_accumulating(tokens, 4, k), _fast_swarm(), ClientConfig(split="blocks")) for k in (1, 2, 3, 4)]
    assert [r.steps_total for r in runs] == [2] * 4
    assert len({(r.tally.bytes_up, r.tally.bytes_down, r.tally.macs, r.tally.chunks) for r in runs}) == 1
    work = _accumulating(tokens, 4, 1)
    calls = [p for t in work.micro_batches for p in work.products(t)]
    assert runs[0].tally.macs == sum(p.macs for p in calls)
    assert runs[0].tally.chunks == len(calls)  # one block, one chunk a call
    assert [r.wall_s for r in runs] == sorted((r.wall_s for r in runs), reverse=True)  # more at once, never slower here


def test_plaintext_work_runs_for_one_micro_batch_at_a_time(monkeypatch: pytest.MonkeyPatch) -> None:
    """Instant links and providers, slow plaintext on 2 of 8 cores: the step is bound by the trainer's
    plaintext lock, so two micro-batches at once gain nothing (without the lock they would run side by side)."""
    from cipherswarm.node.sim import policy

    spans: list[tuple[float, float]] = []
    work_fn = policy.Client.work

    def work(self: policy.Client, kind: str, core_s: float, parallelism: float, then):  # type: ignore[no-untyped-def]
        if kind != "plaintext":
            return work_fn(self, kind, core_s, parallelism, then)
        start = self.sim.now

        def done() -> None:
            spans.append((start, self.sim.now))
            then()

        return work_fn(self, kind, core_s, parallelism, done)

    monkeypatch.setattr(policy.Client, "work", work)
    spec = ProviderSpec(macs_per_s=1e15, rtt_s=0.0, up_bps=1e15, down_bps=1e15)
    swarm = Swarm.uniform(4, spec, ClientSpec(up_bps=1e15, down_bps=1e15, plain_macs_per_s=5e7, plain_parallelism=2.0), seed=1)
    tokens = 4 * 2048
    one = simulate(_accumulating(tokens, 4, 1), swarm)
    one_spans, spans[:] = list(spans), []
    four = simulate(_accumulating(tokens, 4, 4), swarm)
    plain_s = _accumulating(tokens, 4, 4).client_macs(2048) * 2.0 / 5e7  # core-seconds on 2 cores
    assert plain_s / 2.0 > 1.0  # seconds per micro-batch: far above everything else of a step
    assert one.demand_s["client CPU: plaintext and overheads"] < 0.3 * one.wall_s  # 8 cores: the CPU is not what bounds it
    assert four.wall_s == pytest.approx(one.wall_s, rel=0.01)
    assert len(spans) == len(one_spans) == 4
    spans.sort()
    assert all(b[0] >= a[1] for a, b in zip(spans, spans[1:]))  # never two at once
    assert all(end - start == pytest.approx(plain_s / 2.0) for start, end in spans)  # each alone on its 2 cores


def test_max_steps_counts_optimizer_steps() -> None:
    tokens = 6 * 2048 + 1000  # three full steps of two micro-batches, then one of a short micro-batch
    full = simulate(_accumulating(tokens, 2, 2), _fast_swarm())
    short = simulate(_accumulating(tokens, 2, 2), _fast_swarm(), max_steps=1)
    assert full.steps_total == short.steps_total == 4 and len(full.step_s) == 4
    assert len(short.step_s) == 2  # the first full step and the last, short one
    assert short.scale > 1.0
    assert short.wall_s == pytest.approx(full.wall_s, rel=0.05)
    assert short.scale == pytest.approx(short.wall_s / (sum(short.step_s)))
    # the two full steps left out count what the simulated one did: its MACs exactly (a short micro-batch pads to a block)
    assert short.tally.macs == full.tally.macs == 7 * sum(p.macs for p in _accumulating(tokens, 2, 2).products(2048))
    assert short.tally.chunks == full.tally.chunks
    assert short.tally.bytes_up == pytest.approx(full.tally.bytes_up, rel=0.01)
    assert "2 of 4 optimizer steps simulated" in render(short)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        simulate(_accumulating(tokens, 2, 2), _fast_swarm(), max_steps=0)


def test_estimate_cli_takes_accumulation_and_micro_batches_in_flight(capsys: pytest.CaptureFixture[str]) -> None:
    args = ["estimate", "--model", "tiny", "--tokens", "8192", "--micro-batch-tokens", "2048", "--providers", "6"]
    assert main(args + ["--accumulation", "2", "--in-flight", "2"]) == 0
    out = capsys.readouterr().out
    assert "optimizer steps of 2 micro-batches (gradient accumulation), 2 of a step's micro-batches in flight at once" in out
    assert "(mean of 2 simulated, 2 micro-batch(es) each)" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "one optimizer step each (gradient accumulation 1" in out and "(mean of 3 simulated, 1 micro-batch(es) each)" in out
    assert "3 of 4 optimizer steps simulated" in out  # --max-steps 3 counts optimizer steps
    with pytest.raises(SystemExit):
        main(args + ["--in-flight", "0"])
