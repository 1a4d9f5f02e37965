"""The client's scheduling, replayed in simulated time with the client's own code.

Nothing the client decides is re-implemented: a real ``PeerTable`` (on the simulator's clock, with
an in-memory ledger), a real ``ChunkRouter`` and the client's own decisions (``CallDecisions`` and
``ChunkDecisions``, client/decisions.py: whom to send a chunk to, when to wait, back off, hedge,
penalise, accept, rotate the keys or give up) decide, with the adverts the simulated providers would
send and the simulation's own clock and seeded generator. What is here is what the real client
does with those decisions, as events: encrypt the operand, serialise each chunk, send the chunks
(admitted by the client's own ``UploadGate``, each deadline and hedge clock starting when its upload
is admitted), race a hedge against a straggler, and after a wrong result encrypt the chunks not
yet accepted again and send them again. Every step's cost is a flow on the simulated resources
(engine.py).
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
from ..client.decisions import Backoff, CallDecisions, Journal, Send, Wait
from ..client.peers import Need, PeerState, PeerTable
from ..client.router import AttemptFailed, CallShape, ChunkRouter, FailureKind
from ..client.uploads import UploadGate
from ..errors import NodeError
from ..ledger import Ledger
from ..types import Chunk, ProviderAdvert
from .engine import FifoServers, Flow, Resource, Simulator
from .swarm import MESSAGE_OVERHEAD_BYTES, ProviderSpec, Swarm
from .workload import ModelShape, Product

MODEL_HASH = hashlib.sha256(b"cipherswarm-sim-model").digest()
FAR_FUTURE_MS = 1 << 62


class ChunkFailed(RuntimeError):
    """A chunk ran out of attempts or of usable providers, or a call of rotations: the real call would raise too."""


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
    rotations: int = 0  # key rotations after wrong results
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
    """The simulated client: resources, the real table and router, and the layer calls it makes.
    `journal` sees every decision about a chunk, as the real client's `SwarmSession.journal` does."""

    def __init__(self, sim: Simulator, swarm: Swarm, model: ModelShape, config: ClientConfig, rng: random.Random,
                 *, journal: Journal = lambda decision: None) -> None:
        self.sim, self.swarm, self.config, self.rng, self.journal = sim, swarm, config, rng, journal
        c = swarm.client
        shared = swarm.shared_cores
        self.cpu = Resource("machine CPU" if shared else "client CPU", shared or c.cores)
        self.up = None if shared else Resource("client uplink", c.up_bps)
        self.down = None if shared else Resource("client downlink", c.down_bps)
        self.crypto = FifoServers(sim, config.crypto_threads)
        self.uploads = UploadGate(config.upload_slots, config.upload_window_bytes, config.uplink_bps)  # the client's own rule (uploads.py)
        self.nodes: dict[ID, Node] = {}
        for i, spec in enumerate(swarm.providers):
            device = self.cpu if shared else Resource(f"provider {i} device", spec.parallelism)
            links = (None, None) if shared else (Resource(f"provider {i} uplink", spec.up_bps), Resource(f"provider {i} downlink", spec.down_bps))
            node = Node(sim, i, spec, device, *links)
            self.nodes[node.peer] = node
        self.table = PeerTable.for_client(config, Ledger(), clock=lambda: sim.now, wall_ms=lambda: 0)
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
            attempt.fail(FailureKind.UNREACHABLE, "gone")
        self.sim.after(self.rng.expovariate(1 / node.spec.mean_down_s), lambda: self._return(node))

    def _return(self, node: Node) -> None:
        node.alive = True
        self.sim.after(self.rng.expovariate(1 / node.spec.mean_up_s), lambda: self._depart(node))
        self.changed()

    # -- waiting for a usable provider (PeerTable.wait_change) ------------------------------

    def wait(self, seconds: float, then: Callable[[], None]) -> None:
        """Call `then` once the peer table changes (a slot freed, a provider back) or after `seconds`."""
        woken = False

        def wake() -> None:
            nonlocal woken
            if not woken:
                woken = True
                then()

        self._waiting.append(wake)
        self.sim.after(seconds, wake)

    def changed(self) -> None:
        waiting, self._waiting = self._waiting, []
        for wake in waiting:
            self.sim.after(0.0, wake)

    # -- one layer call (session.matmul) ----------------------------------------------------

    def call(self, product: Product, done: Callable[[], None]) -> None:
        c = self.swarm.client
        self.work("call overhead", c.call_overhead_s, 1.0, lambda: self._plan(product, done))

    def _plan(self, product: Product, done: Callable[[], None]) -> None:
        need = Need(MODEL_HASH, held_digests(product), payload=0, macs=0)
        holders = self.table.holders(need)
        if not holders:
            raise ChunkFailed(f"no provider holds {product.key}")
        p = product.params
        shape = CallShape(product.tokens, p.n, product.contraction, product.width, p.in_bytes, p.out_bytes, p.pad_bytes)
        CallRun(self, product, self.router.plan_for(shape, holders, layer=product.key), done).round()


class CallRun:
    """One layer call (session.matmul): rounds of its chunks not yet accepted, each round under fresh keys."""

    def __init__(self, client: Client, product: Product, plan: list[Chunk], done: Callable[[], None]) -> None:
        self.client, self.product, self.done = client, product, done
        self.decisions = CallDecisions(client.router, plan, layer=product.key, clock=lambda: client.sim.now,
                                       rng=client.rng, journal=client.journal)
        self.runs: list[ChunkRun] = []
        self.first_rtts: list[float] = []  # each chunk's first provider's round trip

    def round(self) -> None:
        """Encrypt the operand, then serialise the pending chunks one after the other and send them all."""
        c = self.client.swarm.client
        values = self.product.padded_tokens * self.product.contraction
        self.client.crypto_work("encrypt", values * c.encrypt_ns * 1e-9, lambda: self._serialise(self.decisions.pending(), []))

    def _serialise(self, todo: list[Chunk], runs: list["ChunkRun"]) -> None:
        if len(runs) == len(todo):
            self.runs = runs
            for run in runs:
                run.next_attempt()
            return
        run = ChunkRun(self, todo[len(runs)])
        runs.append(run)
        self.client.crypto_work("wire", run.payload * self.client.swarm.client.wire_ns_per_byte * 1e-9,
                                lambda: self._serialise(todo, runs))

    def accepted(self) -> None:
        if not self.decisions.pending():
            self.client.tally.latency_s += max(self.first_rtts, default=0.0)
            self.done()

    def exposed(self, chunk: Chunk, peer: ID) -> None:
        """A wrong result: every attempt of the round stops, the keys rotate, the pending chunks go again."""
        try:
            self.decisions.rotate(chunk, peer)
        except NodeError as exc:
            raise ChunkFailed(f"{exc} (at {self.client.sim.now:.0f} s)") from None
        self.client.tally.rotations += 1
        for run in self.runs:
            run.cancel()
        self.runs = []
        self.round()
class ChunkRun:
    """One chunk of a round until accepted (dispatch.run_chunk): races of an attempt and maybe a hedge."""

    def __init__(self, call: CallRun, chunk: Chunk) -> None:
        self.call, self.client, self.product, self.chunk = call, call.client, call.product, chunk
        product = self.product
        p = product.params.with_row_parts(chunk.row_parts) if chunk.row_parts > 1 else product.params
        self.blocks = len(chunk.blocks)
        slots = self.blocks * p.n
        self.values_out = slots * len(chunk.output)
        tokens = len(chunk.tokens(p.n, product.tokens))
        self.payload = p.payload_bytes(tokens, len(chunk.contraction)) + MESSAGE_OVERHEAD_BYTES
        self.reply = p.result_bytes(tokens, len(chunk.output)) + MESSAGE_OVERHEAD_BYTES
        self.macs = slots * len(chunk.contraction) * len(chunk.output)
        self.decisions = call.decisions.chunk(chunk, Need(MODEL_HASH, held_digests(product), payload=self.payload, macs=self.macs))
        self.cancelled = False  # its round was called off (a wrong result elsewhere)
        self._raced = False
        self._race: list[Attempt] = []

    def next_attempt(self) -> None:
        if self.cancelled:
            return
        try:
            step = self.decisions.next()
        except NodeError as exc:
            raise ChunkFailed(f"{exc} (at {self.client.sim.now:.0f} s)") from None
        match step:
            case Wait(seconds):
                self.client.wait(seconds, self.next_attempt)
            case Backoff(seconds):
                self.client.sim.after(seconds, self.next_attempt)
            case Send(state, retry):
                self._start_race(state, retry)

    def _start_race(self, state: PeerState, retry: bool) -> None:
        client = self.client
        if retry:
            client.tally.retries += 1
        if not self._raced:
            self._raced = True
            self.call.first_rtts.append(client.nodes[state.peer].spec.rtt_s)
        race: list[Attempt] = []
        self._race = race
        # the hedge clock starts when the first attempt gets its upload slot, as in dispatch._race
        first = Attempt(self, state, on_started=lambda: client.sim.after(
            self.decisions.hedge_after(state), lambda: self._maybe_hedge(race, first)))
        race.append(first)
        first.start()

    def _maybe_hedge(self, race: list["Attempt"], first: "Attempt") -> None:
        if race is not self._race or self.cancelled or self.decisions.accepted or first.ended or first.replying:
            return  # as in dispatch._race: the hedge clock stops when the reply starts
        hedge = self.decisions.hedge(first.state)
        if hedge is None:
            return
        self.client.tally.hedges += 1
        attempt = Attempt(self, hedge)
        race.append(attempt)
        attempt.start()

    def attempt_accepted(self, attempt: "Attempt") -> None:
        """`attempt` was accepted (ChunkDecisions.accept): its twin, if still running, straggled."""
        now = self.client.sim.now
        for other in self._race:
            if other is not attempt and not other.ended:
                self.decisions.straggled(other.state.peer, now - other.started)
                other.cancel()
        self.call.accepted()

    def attempt_failed(self, attempt: "Attempt", *, exposed: bool) -> None:
        """`attempt` failed and was penalised (ChunkDecisions.failed); `exposed`: a wrong result."""
        if exposed:
            self.call.exposed(self.chunk, attempt.state.peer)
            return
        if self.cancelled or self.decisions.accepted or any(not a.ended for a in self._race):
            return
        self.decisions.race_over()
        self.next_attempt()

    def cancel(self) -> None:
        """Its round is called off: stop its attempts; its waits and backoffs come to nothing."""
        self.cancelled = True
        for attempt in self._race:
            attempt.cancel()


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
        self.timeout = run.decisions.timeout(state)  # chosen as the attempt starts, counted from its upload
        self._on_started = on_started

    def start(self) -> None:
        self.client.tally.attempts += 1
        self.node.attempts.add(self)
        self.client.uploads.request(self.run.payload, lambda: self.client.sim.after(0.0, self._upload_slot_taken))

    def _release_upload(self, seconds: float = 0.0) -> None:
        if self.holds_upload:
            self.holds_upload = False
            self.client.uploads.release(self.run.payload, seconds)

    def _upload_slot_taken(self) -> None:
        """The exchange proper (exchange.py): its deadline counts from here, not from the queue."""
        client, node = self.client, self.node
        if self.ended:  # a twin won while this one queued
            client.uploads.release(self.run.payload)
            return
        self.holds_upload = True
        self.started = client.sim.now
        self._on_started()
        # the deadline ends when the reply starts (exchange.py): from then on it is read at the links' pace
        client.sim.after(self.timeout, lambda: None if self.replying else self.fail(
            FailureKind.TIMEOUT, f"no reply within {self.timeout:.1f} s"))
        if not node.alive:  # the dial is refused after a round trip
            client.sim.after(node.spec.rtt_s, lambda: self.fail(FailureKind.UNREACHABLE, "gone"))
            return
        c = client.swarm.client
        self.flow = client.work("exchange", c.exchange_overhead_s, 1.0, self._send)

    def _send(self) -> None:
        if self.ended:
            return
        self.client.tally.bytes_up += self.run.payload

        def sent() -> None:
            self.flow = None
            self._release_upload(self.client.sim.now - self.started)  # written whole: a measurement, as exchange.py's
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
                "verify", values * c.verify_ns * 1e-9, self._checked)))

    def _checked(self) -> None:
        """Decrypted and checked: a cheater's result fails the check, anyone else's is accepted."""
        if self.ended:
            return
        if self.node.spec.cheats:
            self.fail(FailureKind.CHEATED, "wrong result")
            return
        run, client = self.run, self.client
        if run.decisions.accepted:  # a twin was accepted first
            self._end()
            return
        amount = run.macs * self.node.spec.price_per_gmac / 1e9
        client.tally.chunks += 1
        client.tally.macs += run.macs
        client.tally.paid += amount
        run.decisions.accept(self.state.peer, elapsed_s=self.replied_at - self.started, compute_s=self.compute_s,
                             reply=run.reply, reply_s=self.received_at - self.replied_at,
                             macs=run.macs, amount=int(amount), payload=run.payload)
        self._end()
        run.attempt_accepted(self)

    def fail(self, kind: FailureKind, reason: str) -> None:
        if self.ended:
            return
        if kind is FailureKind.TIMEOUT:
            self.client.tally.timeouts += 1
        elif kind is FailureKind.UNREACHABLE:
            self.client.tally.unreachable += 1
        exposed = self.run.decisions.failed(AttemptFailed(self.state.peer, kind, reason))
        self._end()
        self.run.attempt_failed(self, exposed=exposed)

    def cancel(self) -> None:
        """A twin was accepted, or the round called off: stop this attempt's transfers (the provider may still compute)."""
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
        self.run.decisions.released(self.state.peer)
        self.client.changed()
