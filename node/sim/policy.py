"""The client's scheduling, replayed in simulated time with the client's own code.

The chunk plan, provider choice, hedge delay, attempt timeout, bans and scores are not re-implemented:
a real ``PeerTable`` (on the simulator's clock, with an in-memory ledger) and a real ``ChunkRouter``
decide, with the adverts the simulated providers would send. What is mirrored here is the control
flow of ``session.matmul`` and ``dispatch.run_chunk``/``_race``/``_attempt``: encrypt the operand,
serialise each chunk, send the chunks (admitted by the client's own ``UploadGate``, each deadline
and hedge clock starting when its upload is admitted), race a hedge against a straggler, retry a failed
chunk elsewhere (after a backoff where only providers that failed it are left), until each chunk
is accepted. Every step's cost is a flow on the simulated resources (engine.py).
"""

from __future__ import annotations

import fnmatch
import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

from libp2p.peer.id import ID

from cipherswarm.protocol import PROTOCOL_IDS

from ..client.config import ClientConfig
from ..client.peers import Need, PeerState, PeerTable
from ..client.router import CallShape, ChunkRouter
from ..client.uploads import UploadGate
from ..ledger import Ledger
from ..types import Chunk, ProviderAdvert
from .engine import FifoServers, Flow, Resource, Simulator
from .swarm import MESSAGE_OVERHEAD_BYTES, ProviderSpec, Swarm
from .workload import ModelShape, Product

MODEL_HASH = hashlib.sha256(b"cipherswarm-sim-model").digest()
FAR_FUTURE_MS = 1 << 62


class ChunkFailed(RuntimeError):
    """A chunk ran out of attempts or of usable providers: the real call would raise too."""


def layer_digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


def held_digests(product: Product) -> tuple[bytes, ...]:
    """What a provider must hold to serve `product`: every member layer of its group (Need.layer_digests)."""
    return tuple(layer_digest(m.key) for m in product.layer.members)


@dataclass
class Tally:
    """What the run did and spent; `cpu_s` is core-seconds by kind of client work."""

    chunks: int = 0
    attempts: int = 0
    retries: int = 0
    hedges: int = 0
    timeouts: int = 0
    unreachable: int = 0
    bytes_up: float = 0.0
    bytes_down: float = 0.0
    macs: float = 0.0
    paid: float = 0.0
    latency_s: float = 0.0  # one round trip per call, the slowest of its chunks' first attempts
    cpu_s: dict[str, float] = field(default_factory=dict)
    provider_s: float = 0.0  # seconds of products computed, each alone on its device (wasted twins included)
    provider_core_s: float = 0.0  # the same in core-seconds (or device-seconds x parallelism)

    def cpu(self, kind: str, seconds: float) -> None:
        self.cpu_s[kind] = self.cpu_s.get(kind, 0.0) + seconds


class Node:
    """A simulated provider: its device, slots, links and whether it is up."""

    def __init__(self, sim: Simulator, index: int, spec: ProviderSpec, device: Resource,
                 up: Resource | None, down: Resource | None) -> None:
        self.index, self.spec, self.device, self.up, self.down = index, spec, device, up, down
        self.peer = ID(hashlib.sha256(b"provider %d" % index).digest())
        self.slots = FifoServers(sim, spec.slots)
        self.alive = True
        self.attempts: set["Attempt"] = set()

    def advert(self, model: ModelShape) -> ProviderAdvert:
        held = None
        if self.spec.layers:
            held = frozenset(layer_digest(layer.key) for layer in model.layers
                             if any(fnmatch.fnmatchcase(layer.key, p) for p in self.spec.layers))
        return ProviderAdvert(
            peer=self.peer, addrs=(), models=frozenset({MODEL_HASH}), layers=held, backends=("rlwe",), protocols=PROTOCOL_IDS,
            device="sim", macs_per_second=int(self.spec.macs_per_s), price_per_gmac=int(self.spec.price_per_gmac),
            free_slots=self.spec.slots, max_payload_size=self.spec.max_payload, issued_at_ms=0, expires_at_ms=FAR_FUTURE_MS)


class Client:
    """The simulated client: resources, the real table and router, and the layer calls it makes."""

    def __init__(self, sim: Simulator, swarm: Swarm, model: ModelShape, config: ClientConfig, rng: random.Random) -> None:
        self.sim, self.swarm, self.config, self.rng = sim, swarm, config, rng
        c = swarm.client
        shared = swarm.shared_cores
        self.cpu = Resource("machine CPU" if shared else "client CPU", shared or c.cores)
        self.up = None if shared else Resource("client uplink", c.up_bps)
        self.down = None if shared else Resource("client downlink", c.down_bps)
        self.crypto = FifoServers(sim, config.crypto_threads)
        self.uploads = UploadGate(config.upload_slots, config.upload_window_bytes)  # the client's own rule (uploads.py)
        self.nodes: dict[ID, Node] = {}
        for i, spec in enumerate(swarm.providers):
            device = self.cpu if shared else Resource(f"provider {i} device", spec.parallelism)
            links = (None, None) if shared else (Resource(f"provider {i} uplink", spec.up_bps), Resource(f"provider {i} downlink", spec.down_bps))
            node = Node(sim, i, spec, device, *links)
            self.nodes[node.peer] = node
        self.table = PeerTable(ledger=Ledger(), ban_base_s=config.ban_base_s, ban_max_s=config.ban_max_s, link_bps=config.link_bps,
                               max_price_per_gmac=config.max_price_per_gmac, clock=lambda: sim.now, wall_ms=lambda: 0)
        for node in self.nodes.values():
            self.table.update(node.advert(model))
        self.router = ChunkRouter(self.table, config)
        self.tally = Tally()
        self._waiting: list[Callable[[], None]] = []

    # -- resources --------------------------------------------------------------------------

    def work(self, kind: str, core_s: float, parallelism: float, then: Callable[[], None]) -> Flow:
        """Client CPU work of `core_s` core-seconds using up to `parallelism` cores."""
        self.tally.cpu(kind, core_s)
        return self.sim.flows.start(core_s, (self.cpu,), then, cap=parallelism)

    def crypto_work(self, kind: str, core_s: float, then: Callable[[], None]) -> None:
        """Crypto runs in the client's worker threads, `crypto_threads` jobs at once (FIFO)."""
        par = self.swarm.client.crypto_parallelism
        self.crypto.run(lambda finish: self.work(kind, core_s, par, finish), then)

    def transfer(self, nbytes: float, links: tuple[Resource | None, Resource | None], then: Callable[[], None]) -> Flow:
        """Bytes over both links (max-min fair), or loopback CPU work on a shared machine."""
        if self.swarm.shared_cores:
            self.tally.cpu("transport", nbytes * self.swarm.loopback_s_per_byte)
            return self.sim.flows.start(nbytes * self.swarm.loopback_s_per_byte, (self.cpu,), then, cap=1.0)
        return self.sim.flows.start(nbytes, tuple(r for r in links if r is not None), then)

    # -- providers come and go --------------------------------------------------------------

    def start_churn(self) -> None:
        for node in self.nodes.values():
            if math.isfinite(node.spec.mean_up_s):
                self.sim.after(self.rng.expovariate(1 / node.spec.mean_up_s), lambda n=node: self._depart(n))

    def _depart(self, node: Node) -> None:
        node.alive = False
        for attempt in list(node.attempts):
            attempt.fail("unreachable")
        self.sim.after(self.rng.expovariate(1 / node.spec.mean_down_s), lambda: self._return(node))

    def _return(self, node: Node) -> None:
        node.alive = True
        self.sim.after(self.rng.expovariate(1 / node.spec.mean_up_s), lambda: self._depart(node))
        self.changed()

    # -- waiting for a usable provider (PeerTable.wait_change) ------------------------------

    def wait_change(self, need: Need, retry: Callable[[], None]) -> None:
        if not self.table.holders(need):  # the real client gives up after wait_providers_s
            raise ChunkFailed(f"no provider accepts a chunk of {need.payload / 1e6:.1f} MB (a payload limit below it)")
        self._waiting.append(retry)
        ready = self.table.ready_in(need)
        if math.isfinite(ready):
            self.sim.after(ready, self.changed)

    def changed(self) -> None:
        waiting, self._waiting = self._waiting, []
        for retry in waiting:
            self.sim.after(0.0, retry)

    # -- one layer call (session.matmul) ----------------------------------------------------

    def call(self, product: Product, done: Callable[[], None]) -> None:
        c = self.swarm.client
        self.work("call overhead", c.call_overhead_s, 1.0, lambda: self._encrypt(product, done))

    def _encrypt(self, product: Product, done: Callable[[], None]) -> None:
        need = Need(MODEL_HASH, held_digests(product), payload=0, macs=0)
        holders = self.table.holders(need)
        if not holders:
            raise ChunkFailed(f"no provider holds {product.key}")
        p = product.params
        shape = CallShape(product.tokens, p.n, product.contraction, product.width, p.in_bytes, p.out_bytes, p.pad_bytes)
        plan = self.router.plan_for(shape, holders, layer=product.key)
        c = self.swarm.client
        values = product.padded_tokens * product.contraction
        self.crypto_work("encrypt", values * c.encrypt_ns * 1e-9, lambda: self._serialise(product, plan, 0, [], done))

    def _serialise(self, product: Product, plan: list[Chunk], i: int, runs: list["ChunkRun"], done: Callable[[], None]) -> None:
        """Chunks are cut and serialised one after the other, then all sent at once."""
        if i == len(plan):
            pending = {run.chunk.index for run in runs}
            first_rtts: list[float] = []

            def accepted(run: ChunkRun) -> None:
                pending.discard(run.chunk.index)
                if not pending:
                    self.tally.latency_s += max(first_rtts, default=0.0)
                    done()

            for run in runs:
                run.on_accepted = accepted
                run.first_rtts = first_rtts
                run.next_attempt()
            return
        run = ChunkRun(self, product, plan[i])
        runs.append(run)
        self.crypto_work("wire", run.payload * self.swarm.client.wire_ns_per_byte * 1e-9,
                         lambda: self._serialise(product, plan, i + 1, runs, done))


class ChunkRun:
    """One chunk until accepted (dispatch.run_chunk): races of an attempt and maybe a hedge."""

    def __init__(self, client: Client, product: Product, chunk: Chunk) -> None:
        self.client, self.product, self.chunk = client, product, chunk
        p = product.params.with_row_parts(chunk.row_parts) if chunk.row_parts > 1 else product.params
        self.blocks = len(chunk.blocks)
        slots = self.blocks * p.n
        self.values_out = slots * len(chunk.output)
        tokens = len(chunk.tokens(p.n, product.tokens))
        self.payload = p.payload_bytes(tokens, len(chunk.contraction)) + MESSAGE_OVERHEAD_BYTES
        self.reply = p.result_bytes(tokens, len(chunk.output)) + MESSAGE_OVERHEAD_BYTES
        self.macs = slots * len(chunk.contraction) * len(chunk.output)
        self.need = Need(MODEL_HASH, held_digests(product), payload=self.payload, macs=self.macs)
        self.avoid: dict[ID, int] = {}
        self.failures = 0
        self.accepted = False
        self.on_accepted: Callable[[ChunkRun], None] = lambda run: None
        self.first_rtts: list[float] = []
        self._raced = False
        self._race: list[Attempt] = []
        self._race_failed: list[Attempt] = []

    def next_attempt(self) -> None:
        cfg = self.client.config
        if self.failures >= cfg.max_attempts:
            raise ChunkFailed(f"a chunk of {self.product.key} failed {self.failures} attempts (at {self.client.sim.now:.0f} s)")
        state = self.client.router.pick(self.need, avoid=self.avoid)
        if state is None:
            self.client.wait_change(self.need, self.next_attempt)
            return
        if state.peer in self.avoid:  # only providers that failed it are left: back off first
            n = self.avoid[state.peer]
            # ChunkRouter.retry_delay's formula, drawn from the simulation's own generator
            delay = min(cfg.retry_max_s, cfg.retry_base_s * 2 ** (n - 1)) * self.client.rng.uniform(0.5, 1.0)
            self.avoid_backoff(delay)
            return
        self._start_race(state)

    def avoid_backoff(self, delay: float) -> None:
        def again() -> None:
            state = self.client.router.pick(self.need, avoid=self.avoid)
            if state is None:
                self.client.wait_change(self.need, self.next_attempt)
            else:
                self._start_race(state)

        self.client.sim.after(delay, again)

    def _start_race(self, state: PeerState) -> None:
        client = self.client
        client.table.acquire(state.peer)
        if self.failures:
            client.tally.retries += 1
        if not self._raced:
            self._raced = True
            self.first_rtts.append(client.nodes[state.peer].spec.rtt_s)
        self._race, self._race_failed = [], []
        hedge_at = client.router.hedge_delay(state, self.macs, self.payload)
        # the hedge clock starts when the first attempt gets its upload slot, as in dispatch._race
        first = Attempt(self, state, on_started=lambda race=self._race: client.sim.after(
            hedge_at, lambda: self._maybe_hedge(race, first)))
        self._race.append(first)
        first.start()

    def _maybe_hedge(self, race: list["Attempt"], first: "Attempt") -> None:
        if race is not self._race or self.accepted or first.ended or first.replying:
            return  # as in dispatch._race: the hedge clock stops when the reply starts
        hedge = self.client.router.pick(self.need, avoid={first.state.peer: 1})
        if hedge is None or hedge.peer == first.state.peer:
            return
        self.client.table.acquire(hedge.peer)
        self.client.tally.hedges += 1
        attempt = Attempt(self, hedge)
        race.append(attempt)
        attempt.start()

    def attempt_ended(self, attempt: "Attempt", *, ok: bool) -> None:
        if ok:
            if self.accepted:
                return  # a twin won first
            self.accepted = True
            now = self.client.sim.now
            for other in self._race:
                if other is not attempt and not other.ended:
                    self.client.table.on_straggler(other.state.peer, now - other.started)
                    other.cancel()
            self.on_accepted(self)
            return
        self._race_failed.append(attempt)
        if self.accepted or any(not a.ended for a in self._race):
            return
        for failed in self._race_failed:
            self.avoid[failed.state.peer] = self.avoid.get(failed.state.peer, 0) + 1
            self.failures += 1
        self.next_attempt()


class Attempt:
    """One request to one provider (dispatch._attempt): send, compute, reply, check, accept."""

    def __init__(self, run: ChunkRun, state: PeerState, on_started: Callable[[], None] = lambda: None) -> None:
        self.run, self.state = run, state
        self.client = run.client
        self.node = self.client.nodes[state.peer]
        self.started = self.client.sim.now
        self.ended = False
        self.flow: Flow | None = None
        self.compute_s = 0.0
        self.holds_upload = False
        self.replying = False
        self.replied_at = 0.0
        self.received_at = 0.0
        self._on_started = on_started

    def start(self) -> None:
        self.client.tally.attempts += 1
        self.node.attempts.add(self)
        self.client.uploads.request(self.run.payload, lambda: self.client.sim.after(0.0, self._upload_slot_taken))

    def _release_upload(self) -> None:
        if self.holds_upload:
            self.holds_upload = False
            self.client.uploads.release(self.run.payload)

    def _upload_slot_taken(self) -> None:
        """The exchange proper (exchange.py): its deadline counts from here, not from the queue."""
        client, node = self.client, self.node
        if self.ended:  # a twin won while this one queued
            client.uploads.release(self.run.payload)
            return
        self.holds_upload = True
        self.started = client.sim.now
        self._on_started()
        timeout = client.router.attempt_timeout(self.state, self.run.macs, self.run.payload)
        # the deadline ends when the reply starts (exchange.py): from then on it is read at the links' pace
        client.sim.after(timeout, lambda: None if self.replying else self.fail("timeout"))
        if not node.alive:  # the dial is refused after a round trip
            client.sim.after(node.spec.rtt_s, lambda: self.fail("unreachable"))
            return
        c = client.swarm.client
        self.flow = client.work("exchange", c.exchange_overhead_s, 1.0, self._send)

    def _send(self) -> None:
        if self.ended:
            return
        self.client.tally.bytes_up += self.run.payload

        def sent() -> None:
            self.flow = None
            self._release_upload()
            self.client.sim.after(self.node.spec.rtt_s / 2, self._arrive)

        self.flow = self.client.transfer(self.run.payload, (self.client.up, self.node.down), sent)

    def _arrive(self) -> None:
        if self.ended:
            return
        if self.client.rng.random() < self.node.spec.fail_prob:
            return  # lost: nothing comes back, the timeout fires
        node = self.node
        spec = node.spec

        def compute(finish: Callable[[], None]) -> None:
            start = self.client.sim.now
            core_s = self.run.macs * spec.parallelism / spec.macs_per_s
            self.client.tally.provider_s += core_s / spec.parallelism
            self.client.tally.provider_core_s += core_s

            def computed() -> None:
                self.compute_s = self.client.sim.now - start
                finish()

            # the provider keeps computing a chunk whose client gave up: its slot stays taken
            self.client.sim.flows.start(core_s, (node.device,), computed, cap=spec.parallelism)

        node.slots.run(compute, self._reply)

    def _reply(self) -> None:
        if self.ended or not self.node.alive:
            return
        self.replying = True
        self.replied_at = self.client.sim.now + self.node.spec.rtt_s / 2  # its first bytes reach the client
        self.client.tally.bytes_down += self.run.reply

        def received() -> None:
            self.flow = None
            self.received_at = self.client.sim.now + self.node.spec.rtt_s / 2
            self.client.sim.after(self.node.spec.rtt_s / 2, self._open)

        self.flow = self.client.transfer(self.run.reply, (self.node.up, self.client.down), received)

    def _open(self) -> None:
        if self.ended:
            return
        c = self.client.swarm.client
        wire = self.run.reply * c.wire_ns_per_byte * 1e-9
        values = self.run.values_out
        self.client.crypto_work("wire", wire, lambda: self.client.crypto_work(
            "decrypt", values * c.decrypt_ns * 1e-9, lambda: self.client.crypto_work(
                "verify", values * c.verify_ns * 1e-9, self._accept)))

    def _accept(self) -> None:
        if self.ended:
            return
        run, client = self.run, self.client
        if not run.accepted:
            spec = self.node.spec
            amount = run.macs * spec.price_per_gmac / 1e9
            client.tally.chunks += 1
            client.tally.macs += run.macs
            client.tally.paid += amount
            client.table.on_success(self.state.peer, elapsed_s=self.replied_at - self.started, compute_s=self.compute_s,
                                    reply=run.reply, reply_s=self.received_at - self.replied_at,
                                    macs=run.macs, amount=int(amount), payload=run.payload)
        self._end()
        run.attempt_ended(self, ok=True)

    def fail(self, kind: str) -> None:
        if self.ended:
            return
        if kind == "timeout":
            self.client.tally.timeouts += 1
        else:
            self.client.tally.unreachable += 1
        self.client.router.table.on_timeout(self.state.peer)  # both kinds: FailureKind.TIMEOUT | UNREACHABLE
        self._end()
        self.run.attempt_ended(self, ok=False)

    def cancel(self) -> None:
        """A twin was accepted: stop this attempt's transfers (the provider may still compute)."""
        self._end()

    def _end(self) -> None:
        if self.ended:
            return
        self.ended = True
        self._release_upload()
        if self.flow is not None:
            self.client.sim.flows.cancel(self.flow)
            self.flow = None
        self.node.attempts.discard(self)
        self.client.table.release(self.state.peer)
        self.client.changed()
