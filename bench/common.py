"""Shared helpers of the benchmark scripts: timing, a ratio table, and a swarm of provider
processes on loopback serving a saved random model."""

from __future__ import annotations

import os
import statistics
import time
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from cipherswarm.fhe_backend.allocator import retain_freed_memory  # noqa: E402

#: the allocator policy of the cipherswarm command, so that buffers are measured as a node reuses them
RETAINS_FREED_MEMORY = retain_freed_memory()

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from cipherswarm.cli.localswarm import ProviderProcess, start_provider  # noqa: E402
from cipherswarm.node import ClientConfig, SwarmClient  # noqa: E402


def timed(fn: Callable[[], object], *, reps: int = 3, warmup: int = 1) -> tuple[float, object]:
    """Median wall seconds of ``fn`` over ``reps`` runs after ``warmup`` runs, and its last result."""
    out = None
    for _ in range(warmup):
        out = fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def row(label: str, value: str, goal: str = "", met: bool | None = None) -> str:
    mark = "" if met is None else ("  met" if met else "  NOT met")
    return f"  {label:<58} {value:>16}   {goal}{mark}"


def random_llama(sizes: dict, *, layers: int = 1, seed: int = 0) -> LlamaForCausalLM:
    """A seeded random-init LLaMA of ``sizes``: the same weights each call, so providers can load a
    saved copy (``save_pretrained``) of the model a client trains."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=layers, max_position_embeddings=4096, **sizes))


class LoopbackSwarm:
    """Provider processes on 127.0.0.1 serving the model in ``model_dir``, grown one at a time.

    Each provider after the first joins through the first; ``client()`` opens a node client that
    waits for all of them. Every process is stopped on exit.
    """

    def __init__(self, model_dir: Path, run_dir: Path, *, threads: int = 1, startup_timeout: float = 300.0) -> None:
        self.model_dir, self.run_dir = model_dir, run_dir
        self.threads, self.startup_timeout = threads, startup_timeout
        self.providers: list[ProviderProcess] = []
        run_dir.mkdir(parents=True, exist_ok=True)

    def add(self, *extra_args: str) -> ProviderProcess:
        """One more provider, with further `cipherswarm provider` flags if given."""
        first = self.providers[0].addr if self.providers else None
        p = start_provider(len(self.providers), model=self.model_dir, run_dir=self.run_dir, bootstrap=first,
                           threads=self.threads, extra_args=extra_args)
        self.providers.append(p)
        p.wait_addr(self.startup_timeout)
        return p

    def client(self, **config: object) -> SwarmClient:
        """A node client (fresh identity, this swarm's ledger) that finds every provider first."""
        return SwarmClient(model_dir=self.model_dir, bootstrap=[self.providers[0].addr], ledger=self.run_dir / "ledger.sqlite",
                           min_providers=len(self.providers), config=ClientConfig(**config))  # type: ignore[arg-type]

    def __enter__(self) -> "LoopbackSwarm":
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.providers:
            p.stop()
