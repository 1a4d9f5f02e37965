"""The client on a trio loop: discovery feeding the peer table, and exact encrypted layer calls.

`open_session` starts a host (DHT client mode), watches adverts, waits for the first providers and
yields a `SwarmSession`; `SwarmSession.matmul` is one layer call:

1. plan the chunks for the providers holding the layer (router.py);
2. encrypt the whole operand under the channel's current key, cut each chunk's ciphertext out of
   it (token blocks, contraction rows) and send the chunks concurrently (dispatch.py);
3. each verified chunk product is added into the output where it belongs, exactly once;
4. if a provider returned a wrong result, it is banned, every key is rotated, and the chunks not
   yet delivered are encrypted again under the new keys and sent again: each cheating identity
   costs a rotation, and the call goes on while honest holders are left (decisions.py).

What is sent where, and when a call rotates or gives up, is decided by the call's decisions
(decisions.py), which the simulator runs too; `journal` sees every decision.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Sequence
from typing import Any
from contextlib import asynccontextmanager
from dataclasses import replace
from functools import partial

import torch
import trio
from libp2p.crypto.keys import KeyPair
from libp2p.kad_dht.kad_dht import DHTMode
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cipherswarm.fhe_backend import Ciphertext
from cipherswarm.fhe_backend.quant import Precision
from cipherswarm.fhe_backend.verify import FreivaldsVerifier
from cipherswarm.protocol import Range

from ..discovery import AdvertWatcher
from ..engine import ENGINE
from ..errors import NodeError, NoProvidersError, leaf_errors
from ..host import LOOPBACK, NodeHost, open_host
from ..ledger import Ledger
from ..types import Chunk, ClientStats
from ..weights import Layer, ModelWeights
from .config import ClientConfig
from .decisions import CallDecisions, Journal
from .dispatch import ChunkJob, Counters, Dispatcher, KeyExposed, serialise, thread_timed
from .keys import KeyRing, LayerChannel
from .peers import Need, PeerTable
from .router import CallShape, ChunkRouter

log = logging.getLogger(__name__)


def _operand(x: torch.Tensor, contraction: int) -> torch.Tensor:
    if not isinstance(x, torch.Tensor) or x.ndim != 2 or x.is_floating_point() or x.is_complex():
        raise TypeError("x_int must be a 2-D integer tensor (tokens x features)")
    if x.shape[1] != contraction:
        raise ValueError(f"x_int has {x.shape[1]} features, the layer contracts over {contraction}")
    return x.detach().to(device="cpu").contiguous()  # any integer width: encryption and checks widen as they read


class SwarmSession:
    """A running client; made by `open_session`."""

    def __init__(
        self, *, node: NodeHost, weights: ModelWeights, ledger: Ledger, precision: Precision, config: ClientConfig,
        keys: KeyRing | None = None,
    ) -> None:
        self.node = node
        self.weights = weights
        self.ledger = ledger
        self.config = config
        self.peers = PeerTable.for_client(config, ledger)
        self.watcher = AdvertWatcher(
            node, weights.model_hash, self.peers.update, lookup_interval_s=config.lookup_interval_s
        )
        self.router = ChunkRouter(self.peers, config)
        self.keys = keys if keys is not None else KeyRing(precision=precision)  # keys: opened while loading
        self.keys.weights = weights
        self._counters = Counters()
        self._calls = 0
        self._rotations = 0
        self._rng = random.Random()  # backoff jitter: not a secret
        self.journal: Journal = lambda decision: None  # sees every decision about a chunk (decisions.py)
        self.dispatcher = Dispatcher(node=node, table=self.peers, ledger=ledger, config=config, counters=self._counters)

    def stats(self) -> ClientStats:
        """A snapshot of the client's cumulative figures and its peer table."""
        c = self._counters
        # a peer advertised only through a relay is reached directly once a hole punch succeeded
        views = tuple(replace(v, relayed=False) if v.relayed and self.node.direct_to(ID.from_base58(v.peer)) else v
                      for v in self.peers.views())
        return ClientStats(
            calls=self._calls,
            chunks=c.chunks,
            bytes_sent=c.bytes_sent,
            bytes_received=c.bytes_received,
            macs=c.macs,
            paid=c.paid,
            retries=c.retries,
            hedges=c.hedges,
            timeouts=c.timeouts,
            busy=c.busy,
            verification_failures=c.verification_failures,
            key_rotations=self._rotations,
            encrypt_s=c.encrypt_s,
            decrypt_s=c.decrypt_s,
            verify_s=c.verify_s,
            wire_s=c.wire_s,
            hash_s=c.hash_s,
            trio_cpu=self.node.cpu.seconds(),
            chunks_by_peer={v.peer: v.chunks for v in views if v.chunks},
            failures_by_peer=dict(c.failures_by_peer),
            bans=self.peers.bans(),
            peers=views,
        )

    def all_directions(self) -> list[tuple[str, bool]]:
        """(layer, transpose) of every product the trainer may ask: each layer forward and backward."""
        return [(name, t) for name in self.weights.layers for t in (False, True)]

    async def wait_providers(self, count: int, timeout_s: float) -> None:
        """Wait until `count` providers of the model are known; NoProvidersError after `timeout_s`."""
        with trio.move_on_after(timeout_s):
            while len(self.peers) < count:
                self.watcher.request_lookup()
                await self.peers.wait_change(1.0)
            return
        raise NoProvidersError("any layer", known=len(self.peers), reason=f"fewer than {count} found in {timeout_s:.0f} s")

    async def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """Exact int64 `x_int @ W` (or `x_int @ W.T` when `transpose`) for the layer `layer_key`
        (tensor or module name, or a group's key: weights.py), computed encrypted by the swarm and verified."""
        layer = self.weights.resolve(layer_key)
        held = tuple(member.digest for member in self.weights.members(layer.name))  # what a provider must hold
        channel = self.keys.channel(layer, transpose=transpose)
        d_in, d_out = layer.shape.d_in, layer.shape.d_out
        contraction, width = (d_out, d_in) if transpose else (d_in, d_out)
        x = _operand(x_int, contraction)
        if x.shape[0] == 0:
            return torch.zeros((0, width), dtype=torch.int64)
        p = channel.params
        shape = CallShape(x.shape[0], p.n, contraction, width, p.in_bytes, p.out_bytes, p.pad_bytes)
        plan = await self._plan(layer, held, shape)
        call = CallDecisions(self.router, plan, layer=layer.name, clock=trio.current_time, rng=self._rng,
                             starved=self.watcher.request_lookup, journal=lambda decision: self.journal(decision))
        # Chunks of one contraction part cover each output cell once (router.py), and each is
        # copied in; only row chunks add up, into zeros. A layer-sized output is written once
        # instead of zeroed, read and written again.
        partial_sums = any(chunk.row_parts > 1 for chunk in plan)
        y = (torch.zeros if partial_sums else torch.empty)((x.shape[0], width), dtype=torch.int64)
        while True:
            try:
                await self._round(call, held, channel, shape, x, y)
            except KeyExposed as exc:
                call.rotate(exc.chunk, exc.peer)  # ProvidersCheatingError if this identity may cause no more
                log.warning("%s; rotating every key and redoing %d chunk(s)", exc, len(call.pending()))
                self.keys.rotate()
                self._rotations += 1
                continue
            self._calls += 1
            return y

    async def _plan(self, layer: Layer, held: tuple[bytes, ...], shape: CallShape) -> list[Chunk]:
        need = Need(self.weights.model_hash, held, payload=0, macs=0)
        deadline = trio.current_time() + self.config.wait_providers_s
        while not (holders := self.peers.holders(need)):
            if trio.current_time() >= deadline:
                raise NoProvidersError(layer.name, known=len(self.peers), reason="none holds this layer")
            self.watcher.request_lookup()
            await self.peers.wait_change(1.0)
        return self.router.plan_for(shape, holders, layer=layer.name)

    async def _round(
        self,
        call: CallDecisions,
        held: tuple[bytes, ...],
        channel: LayerChannel,
        shape: CallShape,
        x: torch.Tensor,
        y: torch.Tensor,
    ) -> None:
        """Encrypt under the current key and run every chunk not yet accepted. Raises KeyExposed (a
        cheat: rotate and call again) or a NodeError, unwrapped from the nursery's group."""
        key = channel.key
        crypto = self.dispatcher.crypto
        checker = await trio.to_thread.run_sync(channel.checker, limiter=crypto)  # sketched from the file after a rotation
        ct, spent = await trio.to_thread.run_sync(thread_timed, ENGINE.encrypt, key, x, limiter=crypto)
        self._counters.encrypt_s += spent
        # a shared-mask key decrypts each chunk under the binding of its contraction rows
        acquired: list[range] = []
        try:
            for r in {chunk.contraction for chunk in call.pending()} if channel.shared_mask else ():
                await trio.to_thread.run_sync(channel.acquire, key, range(r.start, r.stop), limiter=crypto)
                acquired.append(range(r.start, r.stop))
            await self._send(call, held, channel, shape, x, y, key, checker, ct)
        finally:
            for rows in acquired:
                channel.release(key, rows)

    async def _send(
        self, call: CallDecisions, held: tuple[bytes, ...], channel: LayerChannel, shape: CallShape, x: torch.Tensor,
        y: torch.Tensor, key: Any, checker: FreivaldsVerifier, ct: Ciphertext,
    ) -> None:
        """Send every chunk not yet accepted, cut from `ct`, and deliver each verified product into `y`."""
        crypto = self.dispatcher.crypto
        jobs = []
        # column chunks of the same blocks and rows send the same ciphertext: serialise it once
        parts: dict[tuple[Range, Range], tuple[Ciphertext, tuple[bytes, bytes]]] = {}
        for chunk in call.pending():
            if (chunk.blocks, chunk.contraction) not in parts:
                part = ct.select_blocks(chunk.blocks.start, chunk.blocks.stop)
                if chunk.row_parts > 1:
                    part = part.select_rows(chunk.contraction.start, chunk.contraction.stop, parts=chunk.row_parts)
                (wire, hashed), spent = await trio.to_thread.run_sync(thread_timed, serialise, part, limiter=crypto)
                self._counters.wire_s += spent - hashed
                self._counters.hash_s += hashed
                parts[chunk.blocks, chunk.contraction] = part, wire
            part, (payload, digest) = parts[chunk.blocks, chunk.contraction]
            tokens = chunk.tokens(shape.n, shape.tokens)
            rows, cols = slice(tokens.start, tokens.stop), slice(chunk.contraction.start, chunk.contraction.stop)
            macs = part.blocks * shape.n * len(chunk.contraction) * len(chunk.output)
            jobs.append(ChunkJob(
                layer=call.layer,
                decisions=call.chunk(chunk, Need(self.weights.model_hash, held, payload=len(payload), macs=macs)),
                channel=channel,
                key=key,
                checker=checker,
                ct=part,
                payload=payload,
                payload_sha256=digest,
                x=x[rows, cols],
                width=len(chunk.output),
                deliver=partial(self._deliver, y, call.done, chunk, tokens),
            ))
        try:
            async with trio.open_nursery() as nursery:
                for job in jobs:
                    nursery.start_soon(self.dispatcher.run_chunk, job)
        except BaseExceptionGroup as group:
            errors = leaf_errors(group)
            exposed = [e for e in errors if isinstance(e, KeyExposed)]
            if exposed:
                raise exposed[0] from None
            if errors and all(isinstance(e, NodeError) for e in errors):
                raise errors[0] from None
            raise

    @staticmethod
    def _deliver(y: torch.Tensor, done: set[int], chunk: Chunk, tokens: Range, part: torch.Tensor) -> None:
        """Put one verified chunk product into the call's output (row chunks add up); `done`, the
        chunks accepted before, is where its acceptance is recorded next (ChunkDecisions.accept)."""
        if chunk.index in done:
            raise RuntimeError(f"chunk {chunk.index} delivered twice")
        target = y[tokens.start : tokens.stop, chunk.output.start : chunk.output.stop]
        if chunk.row_parts > 1:
            target.add_(part)
        else:
            target.copy_(part)


@asynccontextmanager
async def open_session(
    *,
    weights: ModelWeights,
    key_pair: KeyPair,
    ledger: Ledger,
    precision: Precision = Precision(),
    bootstrap: Sequence[Multiaddr] = (),
    listen: Sequence[Multiaddr] = (LOOPBACK,),
    config: ClientConfig = ClientConfig(),
    min_providers: int = 1,
    keys: KeyRing | None = None,
) -> AsyncIterator[SwarmSession]:
    """A running client that knows at least `min_providers` providers of the model (waiting up to
    `config.wait_providers_s`); everything stops when the block exits. `keys`: channels already
    opened for `weights` (see `KeyRing.prepare_layer`)."""
    async with open_host(key_pair, listen=listen, dht_mode=DHTMode.CLIENT, bootstrap=bootstrap) as node:
        session = SwarmSession(node=node, weights=weights, ledger=ledger, precision=precision, config=config, keys=keys)
        async with trio.open_nursery() as nursery:
            await nursery.start(session.dispatcher.run)
            await nursery.start(session.watcher.run)
            await session.wait_providers(min_providers, config.wait_providers_s)
            yield session
            nursery.cancel_scope.cancel()

