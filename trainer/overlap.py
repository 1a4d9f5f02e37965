"""The micro-batches of one optimizer step in flight together, with the results of running them one by one.

A remote product keeps the client's link busy one way at a time: the input goes up, the provider
computes, the result comes down, and only then does the next layer's input exist. Two micro-batches
of the same optimizer step do not depend on each other, so while one waits for its product the
other can quantize, encrypt and upload its own: both directions of the link and the providers stay
busy. :class:`StepRunner` runs a step's micro-batches in threads, at most ``in_flight`` at once.

What keeps the results those of the sequential run, bit for bit:

- **One turn at a time.** A micro-batch does its torch work only while it holds the runner's
  turn (a lock); it gives the turn up only while it waits for a remote product
  (:class:`TurnTakingExecutor`). So no two micro-batches compute at once: each op sees the whole
  intra-op thread pool and computes exactly what it computes alone.
- **Its own random numbers.** Each micro-batch draws from its own generator state (dropout),
  seeded at the step's start from the global generator and swapped in with its turn; the global
  state afterwards is the same whatever the interleaving.
- **Gradients summed in order.** Each micro-batch returns ``torch.autograd.grad`` of its loss; the
  step adds them into ``.grad`` in the micro-batches' order.

``in_flight=1`` runs the same code one micro-batch after the other. Memory: each micro-batch in
flight holds its own activations until its backward is done.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import torch

from .executor import MatmulExecutor
from .layers import RemoteContext
from .quantization import CPU_SECONDS, counted_thread, torch_cpu

#: Seeds of the micro-batches' generators: drawn from the global generator, below 2^63.
_SEED_BOUND = 1 << 62


class _Turns:
    """The lock a micro-batch holds while it computes, and the random state it computes with."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    @contextmanager
    def turn(self, rng_state: torch.Tensor) -> Iterator[None]:
        """Hold the turn for a whole micro-batch, drawing random numbers from ``rng_state``."""
        with self._lock, counted_thread():
            torch.set_rng_state(rng_state)
            yield

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """Give the turn up while the caller waits for something outside torch; on return, the
        caller's random state is back as it was. The CPU other micro-batches spent meanwhile is
        taken out of the caller's ``executor`` section (quantization.booked), so each second is
        booked once."""
        state = torch.get_rng_state()
        start, own = torch_cpu(), time.thread_time()
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            torch.set_rng_state(state)
            CPU_SECONDS["executor"] -= (torch_cpu() - start) - (time.thread_time() - own)


class TurnTakingExecutor:
    """An executor whose products give the turn up while they wait (module docstring); anything
    else is the wrapped executor's."""

    def __init__(self, inner: MatmulExecutor, turns: _Turns) -> None:
        self.inner = inner  # the executor that computes; errors name it
        self._turns = turns

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        with self._turns.waiting():
            return self.inner.matmul(layer_key, x_int, transpose=transpose)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


MicroBatch = Callable[[object], tuple[float, int, tuple[torch.Tensor | None, ...]]]
"""One micro-batch's work: its (loss, real tokens, gradients of the trainable parameters)."""


class StepRunner:
    """Runs the micro-batches of a step, ``in_flight`` at once, for results equal to one by one."""

    def __init__(self, in_flight: int) -> None:
        if in_flight < 1:
            raise ValueError(f"micro_batches_in_flight must be >= 1, got {in_flight}")
        self.in_flight = in_flight
        self._turns = _Turns()

    @contextmanager
    def taking_turns(self, context: RemoteContext) -> Iterator[None]:
        """Within the block, the remote layers of ``context`` call its executor through one that
        gives the turn up while it works; the executor is put back after."""
        inner = context.executor
        context.executor = None if inner is None else TurnTakingExecutor(inner, self._turns)
        try:
            yield
        finally:
            context.executor = inner

    def run(self, batches: Sequence[object], work: MicroBatch,
            done: Callable[[int], None] = lambda i: None) -> list[tuple[float, int, tuple[torch.Tensor | None, ...]]]:
        """``work(batch)`` for each batch, in threads, at most ``in_flight`` at once; results in batch
        order. ``done(i)`` is called (in the calling thread) as batch ``i``'s result is taken. The
        first failure, in batch order, is raised once every started micro-batch has ended."""
        seeds = torch.randint(0, _SEED_BOUND, (len(batches),)).tolist()  # from the global generator, in order
        after = torch.get_rng_state()  # the global state the step leaves, whatever ran in between
        states = [torch.Generator().manual_seed(seed).get_state() for seed in seeds]

        def one(i: int) -> tuple[float, int, tuple[torch.Tensor | None, ...]]:
            with self._turns.turn(states[i]):
                return work(batches[i])

        try:  # in threads even one at a time: the same code either way, and the caller's clock apart
            with ThreadPoolExecutor(max_workers=min(self.in_flight, len(batches)), thread_name_prefix="micro-batch") as pool:
                futures = [pool.submit(one, i) for i in range(len(batches))]
                results, error = [], None
                for i, future in enumerate(futures):
                    try:
                        results.append(future.result())
                    except BaseException as exc:  # the others still run to their end: none is left behind
                        error = error or exc
                        continue
                    done(i)
                if error is not None:
                    raise error
                return results
        finally:
            torch.set_rng_state(after)
