"""The swarm simulator: engine timing, the workload against the real trainer, failures, the CLI."""

from __future__ import annotations

import pytest
import torch

from cipherswarm.cli.main import main
from cipherswarm.node.sim import ClientSpec, ModelShape, ProviderSpec, Swarm, Workload, simulate
from cipherswarm.node.sim.engine import FifoServers, Resource, Simulator
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, build
from cipherswarm.trainer.trainer import StepRecord


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
    work = Workload(ModelShape.load(BUNDLED_MODEL), tokens=tokens, micro_batch_tokens=tokens, seq_len=config.seq_len,
                    n_layers_to_skip_for_backprop=config.n_layers_to_skip_for_backprop, precision=config.precision)
    calls = work.products(tokens)
    assert len(calls) == record.remote_calls
    assert sum(p.bytes_in for p in calls) == record.bytes_sent
    assert sum(p.bytes_out for p in calls) == record.bytes_received


def _tiny_swarm(**provider: object) -> tuple[Workload, Swarm]:
    work = Workload(ModelShape.load(BUNDLED_MODEL), tokens=2048, micro_batch_tokens=2048, seq_len=128)
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
