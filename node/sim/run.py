"""A fine-tune in simulated time: held-out loss before, the training steps, held-out loss after.

Like the trainer, every call (one per group of layers that read the same input, workload.py) waits
for the previous one (the model is sequential); inside a call the chunks run concurrently on the
swarm. A training micro-batch is its forward calls, the client's plaintext work (attention, output
head, LoRA, loss), then its backward calls.

Long runs are simulated for their first ``max_steps`` steps (and a short last micro-batch, if any);
the remaining full steps are taken at the mean of the simulated ones, and the counters are scaled
by the tokens left out. Steps are identical work, so this is exact without failures and an
average with them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ..client.config import ClientConfig
from .engine import Simulator
from .policy import Client, Tally
from .swarm import Swarm
from .workload import Workload

SATURATED = 0.6  # a resource busy this share of the wall time or more is what bounds it


@dataclass
class Estimate:
    """What a simulated fine-tune took and cost."""

    workload: Workload
    swarm: Swarm
    config: ClientConfig
    eval_before_s: float
    step_s: list[float]  # simulated training steps (micro-batches), in order
    eval_after_s: float
    wall_s: float  # the whole run, extrapolated to every step
    scale: float  # counters were multiplied by this for the steps not simulated
    tally: Tally
    steps_total: int
    demand_s: dict[str, float] = field(default_factory=dict)  # seconds each resource needs on its own

    @property
    def tokens_per_s(self) -> float:
        return self.workload.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def bottleneck(self) -> str:
        """The busiest resource when it is busy most of the wall time; otherwise the calls' sequence:
        each call's upload, compute and download wait on one another, so no link or CPU is saturated."""
        name = max(self.demand_s, key=self.demand_s.__getitem__)
        share = self.demand_s[name] / self.wall_s if self.wall_s else 1.0
        if share >= SATURATED:
            return name
        return f"the calls' sequence (no resource is saturated: the busiest, {name}, works {share:.0%} of the time)"


def simulate(workload: Workload, swarm: Swarm, config: ClientConfig = ClientConfig(), *, max_steps: int | None = None) -> Estimate:
    """Run the fine-tune of `workload` on `swarm` with the client's `config`."""
    sim = Simulator()
    rng = random.Random(swarm.seed)  # simulation randomness (churn, losses, jitter), not a secret
    client = Client(sim, swarm, workload.model, config, rng)
    client.start_churn()
    batches = workload.micro_batches
    full = [t for t in batches if t == workload.micro_batch_tokens]
    if max_steps is not None and len(full) > max_steps:
        run_batches = full[:max_steps] + [t for t in batches if t != workload.micro_batch_tokens]
    else:
        run_batches = batches
    marks: list[float] = []
    plan: list[tuple[str, int]] = [("eval", workload.micro_batch_tokens)] * workload.eval_batches
    plan += [("step", t) for t in run_batches]
    plan += [("eval", workload.micro_batch_tokens)] * workload.eval_batches
    c = swarm.client

    def next_batch(i: int) -> None:
        marks.append(sim.now)
        if i == len(plan):
            sim.stop()
            return
        kind, tokens = plan[i]
        train = kind == "step"
        calls = workload.products(tokens, backward=train)
        forward = [p for p in calls if not p.transpose]
        backward = [p for p in calls if p.transpose]
        plain_s = workload.client_macs(tokens, backward=train) * c.plain_parallelism / c.plain_macs_per_s

        def run_calls(todo: list, then) -> None:  # type: ignore[no-untyped-def]
            if not todo:
                then()
                return
            client.call(todo[0], lambda: run_calls(todo[1:], then))

        def after_forward() -> None:
            client.work("plaintext", plain_s, c.plain_parallelism, lambda: run_calls(backward, lambda: next_batch(i + 1)))

        run_calls(forward, after_forward)

    sim.after(0.0, lambda: next_batch(0))
    sim.run()
    if len(marks) != len(plan) + 1:
        raise RuntimeError("the simulation stalled: a chunk waits for a provider that never becomes usable")
    durations = [b - a for a, b in zip(marks, marks[1:])]
    e = workload.eval_batches
    before, steps, after = sum(durations[:e]), durations[e : e + len(run_batches)], sum(durations[len(durations) - e :])
    skipped = len(batches) - len(run_batches)
    simulated_full = steps[: len(full[: len(run_batches)])] if skipped else steps
    extra = skipped * (sum(simulated_full) / len(simulated_full)) if skipped else 0.0
    wall = sim_wall = marks[-1]
    wall += extra
    scale = wall / sim_wall if sim_wall else 1.0
    tally = client.tally
    if skipped:
        tally = _scaled(tally, scale)
    estimate = Estimate(workload, swarm, config, before, steps, after, wall, scale, tally, len(batches))
    estimate.demand_s = demands(estimate)
    return estimate


def _scaled(t: Tally, k: float) -> Tally:
    return Tally(
        chunks=round(t.chunks * k), attempts=round(t.attempts * k), retries=round(t.retries * k), hedges=round(t.hedges * k),
        timeouts=round(t.timeouts * k), unreachable=round(t.unreachable * k), bytes_up=t.bytes_up * k,
        bytes_down=t.bytes_down * k, macs=t.macs * k, paid=t.paid * k, latency_s=t.latency_s * k,
        cpu_s={kind: s * k for kind, s in t.cpu_s.items()}, provider_s=t.provider_s * k,
        provider_core_s=t.provider_core_s * k,
    )


def demands(e: Estimate) -> dict[str, float]:
    """Seconds each resource would need on its own for the whole run: the wall time is at least the largest."""
    t, s = e.tally, e.swarm
    out: dict[str, float] = {}
    if s.shared_cores:
        out["machine CPU (client, providers, loopback)"] = (sum(t.cpu_s.values()) + t.provider_core_s) / s.shared_cores
    else:
        out["client uplink"] = t.bytes_up / s.client.up_bps
        out["client downlink"] = t.bytes_down / s.client.down_bps
        out["provider uplinks (all)"] = t.bytes_down / sum(p.up_bps for p in s.providers)
        out["provider compute (all)"] = t.provider_s / len(s.providers)
    cores = s.shared_cores or s.client.cores
    crypto = sum(t.cpu_s.get(k, 0.0) for k in ("encrypt", "decrypt", "verify", "wire"))
    out["client CPU: encrypt+decrypt+verify+wire"] = crypto / min(cores, s.client.crypto_parallelism * e.config.crypto_threads)
    out["client CPU: plaintext and overheads"] = sum(
        t.cpu_s.get(k, 0.0) for k in ("plaintext", "call overhead", "exchange")) / cores
    out["latency (one round trip per call)"] = t.latency_s
    return out
