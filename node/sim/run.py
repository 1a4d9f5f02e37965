"""A fine-tune in simulated time: held-out loss before, the optimizer steps, held-out loss after.

Like the trainer, a micro-batch's calls (one per group of layers that read the same input,
workload.py) run one after another (the model is sequential); inside a call the chunks run
concurrently on the swarm. A training micro-batch is its forward calls, the client's plaintext
work (attention, output head, LoRA, loss), then its backward calls.

An optimizer step is ``gradient_accumulation_steps`` micro-batches (the last step may have fewer).
As in the trainer (``LoraTrainer(micro_batches_in_flight=...)``), up to ``micro_batches_in_flight``
of them run at once: they start in order, the next one of the step starts when one finishes, and
the next step starts when every micro-batch of the step has finished (the optimizer update is a
barrier). Concurrent micro-batches share everything as the real client's calls do (its CPU cores,
crypto threads, upload gate, links, router, peer table, providers), and the client's plaintext work
runs for one micro-batch at a time (the trainer's lock over its local torch work: a FIFO of one on
top of the CPU cores that work uses). With one micro-batch a step (the default) nothing overlaps.
Held-out micro-batches are forward-only and evaluated one after another, as before.

In the shared-mask profile the client binds the keys it keeps (``ClientConfig.binding_budget``,
node/client/keys.py) before its first call, and a key it does not keep before each call of its
layer, as the real client does; concurrent calls of one layer share a binding there, and are each
charged one here.

Long runs are simulated for their first ``max_steps`` full optimizer steps (and a last, short step,
if any); each remaining full step is taken at the mean time and counters (bytes, MACs, CPU, ...) of
the simulated full steps. Steps are identical work, so this is exact without failures and an
average with them.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields, replace

from ..client.config import ClientConfig
from .engine import Simulator
from .policy import Client, Tally
from .swarm import Swarm
from .workload import Product, Workload

SATURATED = 0.6  # a resource busy this share of the wall time or more is what bounds it


@dataclass
class Estimate:
    """What a simulated fine-tune took and cost."""

    workload: Workload
    swarm: Swarm
    config: ClientConfig
    eval_before_s: float
    step_s: list[float]  # simulated optimizer steps, in order: each from its first micro-batch's start to its last's end
    eval_after_s: float
    wall_s: float  # the whole run, extrapolated to every step
    scale: float  # the whole run's time over the simulated time (1.0: every step was simulated)
    tally: Tally
    steps_total: int  # optimizer steps of the whole run
    demand_s: dict[str, float] = field(default_factory=dict)  # seconds each resource needs on its own
    latency_s: float = 0.0  # round trips the wall time cannot hide: each phase's calls' over its micro-batches at once

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


@dataclass(frozen=True)
class _Phase:
    """Micro-batches run together: an optimizer step's (`train`), or one held-out micro-batch."""

    train: bool
    batches: list[int]  # tokens of each micro-batch, in the order they start
    at_once: int  # micro-batches in flight at most


def simulate(workload: Workload, swarm: Swarm, config: ClientConfig = ClientConfig(), *, max_steps: int | None = None) -> Estimate:
    """Run the fine-tune of `workload` on `swarm` with the client's `config` (module docstring);
    `max_steps` counts optimizer steps."""
    if max_steps is not None and max_steps < 1:
        raise ValueError(f"max_steps must be >= 1 (None: every step), got {max_steps}")
    sim = Simulator()
    rng = random.Random(swarm.seed)  # simulation randomness (churn, losses, jitter), not a secret
    client = Client(sim, swarm, workload.model, config, rng)
    client.start_churn()
    mbt, ga = workload.micro_batch_tokens, workload.gradient_accumulation_steps
    steps = workload.optimizer_steps
    full = [s for s in steps if s == [mbt] * ga]  # all but maybe the last
    if max_steps is not None and len(full) > max_steps:
        run_steps = full[:max_steps] + [s for s in steps if s != [mbt] * ga]
    else:
        run_steps = steps
    evals = [_Phase(False, [mbt], 1)] * workload.eval_batches
    plan = evals + [_Phase(True, s, workload.micro_batches_in_flight) for s in run_steps] + evals
    marks: list[float] = []
    tallies: list[Tally] = []  # the counters at each mark
    c = swarm.client
    plaintext = _Lock()  # the trainer's lock over the client's local torch work

    def micro_batch(tokens: int, train: bool, done: Callable[[], None]) -> None:
        """Forward calls one after another, the plaintext work (one micro-batch at a time), backward calls."""
        calls = workload.products(tokens, backward=train)
        forward = [p for p in calls if not p.transpose]
        backward = [p for p in calls if p.transpose]
        plain_s = workload.client_macs(tokens, backward=train) * c.plain_parallelism / c.plain_macs_per_s

        def run_calls(todo: list[Product], then: Callable[[], None]) -> None:
            if not todo:
                then()
                return
            p = todo[0]
            if not p.binding_macs or (p.key, p.transpose) in kept:
                client.call(p, lambda: run_calls(todo[1:], then))
                return
            binding_s = p.binding_macs * c.plain_parallelism / c.plain_macs_per_s
            client.work("binding", binding_s, c.plain_parallelism, lambda: client.call(p, lambda: run_calls(todo[1:], then)))

        def local(release: Callable[[], None]) -> None:
            def computed() -> None:
                release()
                run_calls(backward, done)

            client.work("plaintext", plain_s, c.plain_parallelism, computed)

        run_calls(forward, lambda: plaintext.hold(local))

    def next_phase(i: int) -> None:
        marks.append(sim.now)
        tallies.append(replace(client.tally, cpu_s=dict(client.tally.cpu_s)))
        if i == len(plan):
            sim.stop()
            return
        phase = plan[i]
        waiting = list(phase.batches)
        running = 0

        def start() -> None:
            nonlocal running
            running += 1
            micro_batch(waiting.pop(0), phase.train, finished)

        def finished() -> None:
            nonlocal running
            running -= 1
            if waiting:
                start()
            elif not running:
                next_phase(i + 1)  # the optimizer update: every micro-batch of the step is done

        for _ in range(min(phase.at_once, len(waiting))):
            start()

    # a shared-mask client binds the keys it keeps before its first call, the others for each call
    kept = workload.kept_bindings(config.binding_budget)
    bind_s = workload.binding_macs(kept) * c.plain_parallelism / c.plain_macs_per_s
    if bind_s:
        sim.after(0.0, lambda: client.work("binding", bind_s, c.plain_parallelism, lambda: next_phase(0)))
    else:
        sim.after(0.0, lambda: next_phase(0))
    sim.run()
    if len(marks) != len(plan) + 1:
        raise RuntimeError("the simulation stalled: a chunk waits for a provider that never becomes usable")
    durations = [b - a for a, b in zip(marks, marks[1:])]
    # at most `at_once` calls are in flight in a phase, each at least its round trip: what the wall time holds of them
    latency = [(b.latency_s - a.latency_s) / min(p.at_once, len(p.batches)) for p, a, b in zip(plan, tallies, tallies[1:])]
    e = workload.eval_batches
    before, step_s, after = sum(durations[:e]), durations[e : e + len(run_steps)], sum(durations[len(durations) - e :])
    skipped = len(steps) - len(run_steps)
    wall = sim_wall = marks[-1]
    tally = client.tally
    if skipped:  # the steps left out are full ones: each takes the mean time and counts of the simulated full steps
        n = len(run_steps) - (len(steps) - len(full))  # = max_steps
        k = skipped / n
        wall += k * sum(step_s[:n])
        tally = _plus(tally, tallies[e], tallies[e + n], k)
        latency.append(k * sum(latency[e : e + n]))
    scale = wall / sim_wall if sim_wall else 1.0
    estimate = Estimate(workload, swarm, config, before, step_s, after, wall, scale, tally, len(steps), latency_s=sum(latency))
    estimate.demand_s = demands(estimate)
    return estimate


class _Lock:
    """A FIFO lock: `hold(work)` runs `work(release)` once no other holder is left (at once if free)."""

    def __init__(self) -> None:
        self._held = False
        self._queue: deque[Callable[[Callable[[], None]], None]] = deque()

    def hold(self, work: Callable[[Callable[[], None]], None]) -> None:
        if self._held:
            self._queue.append(work)
            return
        self._held = True
        work(self._release)

    def _release(self) -> None:
        if self._queue:
            self._queue.popleft()(self._release)
        else:
            self._held = False


def _plus(t: Tally, start: Tally, end: Tally, k: float) -> Tally:
    """`t` plus `k` times what was counted from `start` to `end` (counts rounded)."""
    out = {}
    for f in fields(Tally):
        if f.name == "cpu_s":
            continue
        now, delta = getattr(t, f.name), getattr(end, f.name) - getattr(start, f.name)
        out[f.name] = now + (round(k * delta) if isinstance(now, int) else k * delta)
    cpu = {kind: s + k * (end.cpu_s.get(kind, 0.0) - start.cpu_s.get(kind, 0.0)) for kind, s in t.cpu_s.items()}
    return Tally(**out, cpu_s=cpu)


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
        t.cpu_s.get(k, 0.0) for k in ("plaintext", "binding", "call overhead", "exchange")) / cores
    out["latency (one round trip per call)"] = e.latency_s
    return out
