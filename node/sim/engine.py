"""The discrete-event core: a clock with a heap of timed callbacks, processor-sharing resources on
which flows of work progress at max-min fair rates, and FIFO servers.

Why flows: a CPU core, a link and a GPU are all "units per second shared by whoever uses them now".
A flow has an amount of work (core-seconds, bytes, MACs), crosses one or more resources (an upload
crosses the sender's uplink and the receiver's downlink) and may be capped (a single-threaded job
uses at most one core). Whenever a flow starts or ends, the rates of all flows are recomputed by
progressive filling (max-min fairness), which is processor sharing on a single resource and the
usual fluid model of TCP flows sharing links. FIFO servers model what queues strictly: a provider's
compute slots and the client's crypto thread limiter.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

EPS = 1e-12


class Simulator:
    """A clock and a heap of (time, sequence, callback); callbacks schedule further callbacks."""

    def __init__(self) -> None:
        self.now = 0.0
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.flows = FlowModel(self)
        self.stopped = False

    def stop(self) -> None:
        """End `run` after the current event (timers and churn left in the heap never fire)."""
        self.stopped = True

    def at(self, time: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self._heap, (max(time, self.now), next(self._seq), fn))

    def after(self, delay: float, fn: Callable[[], None]) -> None:
        self.at(self.now + max(delay, 0.0), fn)

    def run(self, until: float = math.inf) -> float:
        """Process events in time order (ties in scheduling order) until none is left or `until`."""
        while self._heap and self._heap[0][0] <= until and not self.stopped:
            self.now, _, fn = heapq.heappop(self._heap)
            fn()
        return self.now


@dataclass(eq=False)
class Resource:
    """A processor-sharing resource: `capacity` units per second divided among the flows on it."""

    name: str
    capacity: float
    done: float = 0.0  # units served so far (utilisation = done / capacity / elapsed)
    flows: set["Flow"] = field(default_factory=set)


@dataclass(eq=False)
class Flow:
    """`amount` units of work through `resources`, at most `cap` units per second."""

    amount: float
    resources: tuple[Resource, ...]
    on_done: Callable[[], None]
    cap: float = math.inf
    rate: float = 0.0
    started: float = 0.0
    active: bool = True


class FlowModel:
    """Every running flow; rates are max-min fair and recomputed at each start and end."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._flows: set[Flow] = set()
        self._last = 0.0
        self._generation = 0

    def start(self, amount: float, resources: tuple[Resource, ...], on_done: Callable[[], None],
              cap: float = math.inf) -> Flow:
        """A flow of `amount` units; `on_done` runs when it is served (at once if it is empty)."""
        flow = Flow(amount, resources, on_done, cap, started=self._sim.now)
        if amount <= EPS or (not resources and math.isinf(cap)):
            flow.active = False
            self._sim.after(0.0, on_done)
            return flow
        self._settle()
        self._flows.add(flow)
        for r in resources:
            r.flows.add(flow)
        self._reschedule()
        return flow

    def cancel(self, flow: Flow) -> None:
        """Stop a flow without calling its `on_done` (an abandoned transfer)."""
        if not flow.active:
            return
        self._settle()
        self._remove(flow)
        self._reschedule()

    def _remove(self, flow: Flow) -> None:
        flow.active = False
        self._flows.discard(flow)
        for r in flow.resources:
            r.flows.discard(flow)

    def _settle(self) -> None:
        """Advance every flow's remaining amount to now at its current rate."""
        dt = self._sim.now - self._last
        if dt > 0:
            for f in self._flows:
                served = f.rate * dt
                f.amount -= served
                for r in f.resources:
                    r.done += served
        self._last = self._sim.now

    def _allocate(self) -> None:
        """Progressive filling: raise all unfrozen rates together until a resource fills or a cap is met."""
        unfrozen = set(self._flows)
        for f in unfrozen:
            f.rate = 0.0
        left = {r: r.capacity for f in unfrozen for r in f.resources}
        while unfrozen:
            counts: dict[Resource, int] = {}
            for f in unfrozen:
                for r in f.resources:
                    counts[r] = counts.get(r, 0) + 1
            step = min((left[r] / n for r, n in counts.items()), default=math.inf)
            step = min(step, min(f.cap - f.rate for f in unfrozen))
            for f in unfrozen:
                f.rate += step
                for r in f.resources:
                    left[r] -= step
            full = {r for r, rem in left.items() if rem <= EPS * max(1.0, r.capacity)}
            unfrozen = {f for f in unfrozen if f.cap - f.rate > EPS * max(1.0, f.rate) and not full.intersection(f.resources)}

    def _reschedule(self) -> None:
        self._allocate()
        self._generation += 1
        generation = self._generation
        soonest = min((f.amount / f.rate for f in self._flows if f.rate > 0), default=math.inf)
        if not math.isinf(soonest):
            self._sim.after(soonest, lambda: self._on_timer(generation))

    def _on_timer(self, generation: int) -> None:
        if generation != self._generation:  # rates changed since: a newer timer is pending
            return
        self._settle()
        # less than a nanosecond of work left is done: float time stops advancing below that at large clocks
        finished = [f for f in self._flows if f.amount <= max(EPS, f.rate * 1e-9)]
        for f in finished:
            self._remove(f)
        self._reschedule()
        for f in finished:
            f.on_done()


class FifoServers:
    """`servers` places taken in arrival order; a request waits in a FIFO queue for a free one."""

    def __init__(self, sim: Simulator, servers: int) -> None:
        self._sim = sim
        self.servers = servers
        self.busy = 0
        self._queue: deque[Callable[[], None]] = deque()

    def acquire(self, granted: Callable[[], None]) -> None:
        """Call `granted` (now or later) once a place is held; the holder calls `release`."""
        if self.busy < self.servers:
            self.busy += 1
            self._sim.after(0.0, granted)
        else:
            self._queue.append(granted)

    def release(self) -> None:
        if self._queue:
            self._sim.after(0.0, self._queue.popleft())
        else:
            self.busy -= 1

    def run(self, work: Callable[[Callable[[], None]], None], on_done: Callable[[], None]) -> None:
        """Hold a place while `work(finish)` runs: `work` calls `finish` when done."""

        def granted() -> None:
            def finish() -> None:
                self.release()
                on_done()

            work(finish)

        self.acquire(granted)
