"""Real libp2p nodes on 127.0.0.1 for the node tests: providers in this process or as
`cipherswarm provider` processes (started as the testnet starts them, cli/localswarm.py), and clients.

Everything listens on loopback only and mDNS stays off. Every helper is an async context manager,
so nodes stop in the reverse order they started, inside the test's own deadline.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from multiaddr import Multiaddr

from cipherswarm.cli.localswarm import ProviderProcess, start_provider
from cipherswarm.node import ClientConfig, Ledger, ModelWeights, NodeHost, Provider, ProviderConfig, open_host
from cipherswarm.node.client import SwarmSession, open_session
from cipherswarm.node.client.keys import KeyRing
from cipherswarm.node.host import LOOPBACK

REPO = Path(__file__).resolve().parents[2]
PROCESS_START_S = 60.0  # a provider process imports torch, quantizes, benchmarks: generous on 2 busy cores
PROCESS_BENCHMARK_S = 0.1  # a provider process's start-up throughput measurement: short, the tests need no figure
PROCESS_ENV = {"OMP_NUM_THREADS": "1"}  # one BLAS thread each: several processes share 2 busy cores
_launched = itertools.count()  # provider numbers of this test process: each its own key and log


def client_config(**changes: object) -> ClientConfig:
    """Client settings for loopback tests: short waits, so a broken test fails fast."""
    fields: dict[str, object] = dict(wait_providers_s=15.0, lookup_interval_s=2.0, ban_base_s=30.0)
    fields.update(changes)
    return ClientConfig(**fields)  # type: ignore[arg-type]


def random_operand(tokens: int, features: int, bits: int = 8) -> torch.Tensor:
    half = 1 << (bits - 1)
    return torch.randint(-half, half, (tokens, features))


def reference(weights: ModelWeights, layer: str, x: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    q = weights.read(layer).q.long()  # a group: its members side by side
    return x @ (q.T if transpose else q)


@dataclass
class Running:
    """A provider running in this process."""

    provider: Provider
    node: NodeHost

    @property
    def addr(self) -> Multiaddr:
        return self.node.addrs()[0]


@asynccontextmanager
async def running_provider(
    weights: ModelWeights, *, bootstrap: Sequence[Multiaddr] = (), ledger: Ledger | None = None, **config: object
) -> AsyncIterator[Running]:
    key_pair = create_new_key_pair()
    settings: dict[str, object] = dict(benchmark_s=0.1, advert_interval_s=2.0)
    settings.update(config)
    provider = Provider(weights=weights, key_pair=key_pair, config=ProviderConfig(**settings), ledger=ledger)  # type: ignore[arg-type]
    async with open_host(key_pair, bootstrap=bootstrap) as node, trio.open_nursery() as nursery:
        await nursery.start(provider.serve, node)
        yield Running(provider, node)
        nursery.cancel_scope.cancel()


@asynccontextmanager
async def providers(weights: ModelWeights, configs: Sequence[dict[str, object]]) -> AsyncIterator[list[Running]]:
    """One provider per config; each after the first joins through the first."""
    async with AsyncExitStack() as stack:
        started: list[Running] = []
        for config in configs:
            bootstrap = [started[0].addr] if started else []
            started.append(await stack.enter_async_context(running_provider(weights, bootstrap=bootstrap, **config)))
        yield started


def thin(weights: ModelWeights) -> ModelWeights:
    """The same model as a client holds it: summaries only, every weight left in the files."""
    return ModelWeights([replace(layer, weight=None) for layer in weights.layers.values()],
                        files=weights.files, conv1d=weights.conv1d)


@asynccontextmanager
async def session(
    weights: ModelWeights, bootstrap: Sequence[Multiaddr], *, ledger: Ledger | None = None, min_providers: int = 1,
    profile: str = "default", listen: Sequence[Multiaddr] = (LOOPBACK,), **config: object,
) -> AsyncIterator[SwarmSession]:
    """A client of the model of `weights`, holding none of its weights (it reads them from the files),
    encrypting in `profile`, listening on `listen`, with ClientConfig's `config`."""
    with Ledger() if ledger is None else nullcontext(ledger) as book:
        async with open_session(
            weights=thin(weights),
            key_pair=create_new_key_pair(),
            ledger=book,
            bootstrap=bootstrap,
            config=client_config(**config),
            min_providers=min_providers,
            keys=KeyRing(profile=profile, binding_budget=client_config(**config).binding_budget),
            listen=listen,
        ) as client:
            yield client


def launch_provider(model_dir: Path, run_dir: Path, *args: str, bootstrap: Sequence[Multiaddr] = ()) -> ProviderProcess:
    """`cipherswarm provider` with the flags `args`, started by the testnet's launcher with its own key
    and log in `run_dir` and price 0; `wait_addr` before using it, `stop` after."""
    return start_provider(next(_launched), model=model_dir, run_dir=run_dir, bootstrap=[str(a) for a in bootstrap],
                          price=0, benchmark_s=PROCESS_BENCHMARK_S, env=PROCESS_ENV, extra_args=args)


@asynccontextmanager
async def provider_process(
    model_dir: Path, tmp_path: Path, *args: str, bootstrap: Sequence[Multiaddr] = ()
) -> AsyncIterator[ProviderProcess]:
    """:func:`launch_provider`, yielded once it prints its multiaddr, stopped after (even when the
    test is cancelled)."""
    async with serving(launch_provider(model_dir, tmp_path, *args, bootstrap=bootstrap)) as provider:
        yield provider


@asynccontextmanager
async def serving(process: ProviderProcess) -> AsyncIterator[ProviderProcess]:
    """A launched provider process, yielded once it prints its multiaddr, stopped after (even when
    the test is cancelled)."""
    try:
        await trio.to_thread.run_sync(process.wait_addr, PROCESS_START_S, abandon_on_cancel=True)
        yield process
    finally:
        with trio.CancelScope(shield=True):
            await trio.to_thread.run_sync(process.stop)
