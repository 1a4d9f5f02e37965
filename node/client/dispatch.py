"""Sending chunks to providers: one attempt, hedged races, and retries until a chunk is accepted.

An attempt (`_attempt`) is one exchange on one stream: a fresh request (new id and nonce) for the
chunk's ciphertext, offering the price of the provider's advert it acts on (capped by the user's
`max_price_per_gmac`), the provider's signed reply checked with `protocol.verify_reply` and its
receipt's price against that advert (`check_reply`), the result decrypted and checked with
Freivalds, then accepted: delivered into the call's output, its receipt countersigned, recorded in
the ledger and sent back. A receipt that charges more than the advert is a cheat like a wrong
result: the provider is banned for good and nothing is paid. The stream I/O itself runs in an
Exchange task of the dispatcher's own nursery, so that cancelling an attempt never cancels
libp2p I/O (exchange.py says why). Every failure is classified (router.FailureKind).

What to do is never decided here: the chunk's decisions (decisions.py, shared with the simulator)
say whom to send it to, when to wait, back off, hedge or give up, and turn each failure into a
penalty; this module does the sending, waiting and sleeping they ask for. A race (`_race`) runs an
attempt at the provider chosen and, if it has not started replying within the hedge delay, a
second one at the hedge chosen; the first accepted result cancels the other (trio's
race-and-cancel). A chunk (`run_chunk`) runs races until one is accepted.

Exactly once: a chunk's result is delivered by the first attempt that passes verification, and
that attempt alone records and countersigns its receipt; a slower twin that also passes is
dropped. A wrong result raises KeyExposed after the provider is banned: the call then rotates its
keys and re-encrypts the chunks not yet delivered (session.py), so nothing is lost and nothing is
applied twice.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import trio
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from cipherswarm.fhe_backend import Ciphertext, FheError, MatmulResult, Params, VerificationFailed
from cipherswarm.fhe_backend.ciphertext import result_size
from cipherswarm.fhe_backend.parallel import helper_seconds
from cipherswarm.fhe_backend.verify import FreivaldsVerifier
from cipherswarm.protocol import (
    Busy,
    DeadlineExceeded,
    Frame,
    Limits,
    MatmulReply,
    MatmulRequest,
    ProtocolError,
    Sealed,
    SignedReceipt,
    TruncatedFrame,
    Verified,
    WeightSlice,
    countersign_receipt,
    seal,
    sha256,
    verify_reply,
)

from ..discovery import now_ms
from ..engine import BACKEND, ENGINE, encode_params
from ..host import NodeHost
from ..identity import signing_key
from ..ledger import Ledger
from ..types import Chunk
from ..weights import group_members
from .config import ClientConfig
from .decisions import Backoff, ChunkDecisions, Send, Wait
from .exchange import Exchange, ExchangeExpired, wait_any
from .keys import LayerChannel
from .peers import Need, PeerState, PeerTable
from .router import AttemptFailed, FailureKind
from .uploads import Uploads

log = logging.getLogger(__name__)


class KeyExposed(Exception):
    """A provider returned a wrong result for `chunk` (it is banned by now): the keys in use must be rotated."""

    def __init__(self, peer: ID, reason: str, chunk: Chunk) -> None:
        super().__init__(f"{peer} returned a wrong result: {reason}")
        self.peer = peer
        self.chunk = chunk


@dataclass
class Counters:
    """What the dispatcher counts; session.stats() turns it into an immutable ClientStats."""

    chunks: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    macs: int = 0
    paid: int = 0
    retries: int = 0
    hedges: int = 0
    timeouts: int = 0
    busy: int = 0
    verification_failures: int = 0
    failures_by_peer: dict[str, int] = field(default_factory=dict)
    # CPU seconds of the worker threads (time.thread_time), added on the trio side: no races
    encrypt_s: float = 0.0
    decrypt_s: float = 0.0
    verify_s: float = 0.0
    wire_s: float = 0.0  # serialising ciphertexts and parsing results
    hash_s: float = 0.0  # SHA-256 of request and reply payloads


def cpu_now() -> float:
    """Worker thread: CPU seconds of this thread and of the crypto pool's work for it, so far."""
    return time.thread_time() + helper_seconds()


def thread_timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """Worker thread: ``fn(*args)`` and the CPU seconds it took, the crypto pool's share included."""
    t0 = cpu_now()
    out = fn(*args)
    return out, cpu_now() - t0


@dataclass(eq=False)
class ChunkJob:
    """A chunk of one call, encrypted under one key, ready to send."""

    layer: str  # tensor name as the wire carries it, or a group's key of them (weights.py)
    decisions: ChunkDecisions  # whom to send it to, and what its outcomes mean (decisions.py)
    channel: LayerChannel
    key: Any  # the secret key the ciphertext was made under
    checker: FreivaldsVerifier  # the channel's checker when `key` was current
    ct: Ciphertext  # the chunk's ciphertext (its params are the chunk's)
    payload: bytes  # ct.to_bytes()
    payload_sha256: bytes  # its digest, computed once in a worker thread (see serialise)
    x: torch.Tensor  # the chunk's plaintext operand, for the Freivalds check
    width: int  # output columns of the chunk
    deliver: Callable[[torch.Tensor], None]  # puts the verified product into the call's output

    @property
    def chunk(self) -> Chunk:
        return self.decisions.chunk

    @property
    def need(self) -> Need:
        return self.decisions.need

    @property
    def weight_slice(self) -> WeightSlice:
        return self.chunk.weight_slice(self.channel.transpose)

    @property
    def params(self) -> Params:
        return self.ct.params


def serialise(ct: Ciphertext) -> tuple[tuple[bytes, bytes], float]:
    """Worker thread: the ciphertext's wire bytes and their SHA-256, which every request for them
    carries (hashing a layer-sized payload takes tens of ms, too long for the event loop), and the
    CPU seconds the hash took, so that serialising and hashing are booked apart."""
    payload = ct.to_bytes()
    t0 = time.thread_time()
    digest = sha256(payload)
    return (payload, digest), time.thread_time() - t0


def reply_limits(params: Params, tokens: int, width: int) -> Limits:
    """The limits a reply is read under: its payload exactly the size an honest result of this shape
    has, so that a provider declaring more is refused from the reply's header (an invalid reply, the
    cheat it is) before the client's downlink carries a byte of it."""
    return Limits(max_payload_size=result_size(params, tokens, width))


def offer(advert_price: int, config: ClientConfig) -> int:
    """The price per GMAC a request offers a provider that advertised `advert_price`: that price,
    never more than the most the user pays (such providers are not holders in the first place)."""
    return min(advert_price, config.max_price_per_gmac)


def check_reply(frame: Frame, *, peer: ID, request: Sealed[MatmulRequest], payload_sha256: bytes,
                advert_price: int) -> Verified[MatmulReply]:
    """`protocol.verify_reply` (given the payload's SHA-256), with the provider's error replies
    classified, and a receipt charging more than `advert_price`, the price of the advert the
    request acted on, refused even if within the request's offer. AttemptFailed otherwise."""
    try:
        reply = verify_reply(frame, peer=peer.to_bytes(), request=request, payload_sha256=payload_sha256)
    except ProtocolError as exc:
        if not exc.remote:  # the reply itself failed a check: only the provider could have sent it
            raise AttemptFailed(peer, FailureKind.CHEATED, f"invalid reply: {exc}") from None
        if isinstance(exc, Busy):
            raise AttemptFailed(peer, FailureKind.BUSY, "busy", retry_after_s=exc.retry_after_ms / 1000) from None
        raise AttemptFailed(peer, FailureKind.REFUSED, f"{exc.code.name}: {exc}") from None
    assert reply.message.receipt is not None  # verify_reply checked the receipt of an OK reply
    charged = reply.message.receipt.receipt.price_per_gmac
    if charged > advert_price:
        raise AttemptFailed(peer, FailureKind.CHEATED, f"overbilled: receipt at {charged} per GMAC, advertised {advert_price}")
    return reply


def _open_result(job: ChunkJob, payload: bytes) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Worker thread: decrypt the provider's result and check it. FheError if it is wrong in any way.
    Also returns the CPU seconds spent parsing, decrypting and checking (the crypto pool's included)."""
    t0 = cpu_now()
    result = MatmulResult.from_bytes(payload)
    if (result.params, result.key_id, result.tokens, result.d_out) != (job.params, job.ct.key_id, job.ct.tokens, job.width):
        raise VerificationFailed("the result is not for this request's ciphertext, parameters or shape")
    t1 = cpu_now()
    c, o = job.chunk.contraction, job.chunk.output
    y = ENGINE.decrypt(job.key, result, rows=range(c.start, c.stop), columns=range(o.start, o.stop))
    t2 = cpu_now()
    job.checker.check(job.x, y, contraction=range(c.start, c.stop), output=range(o.start, o.stop), params=result.params)
    return y, (t1 - t0, t2 - t1, cpu_now() - t2)


class Dispatcher:
    """Runs chunks against the providers in the peer table, as their decisions say."""

    def __init__(
        self,
        *,
        node: NodeHost,
        table: PeerTable,
        ledger: Ledger,
        config: ClientConfig,
        counters: Counters,
    ) -> None:
        self._node = node
        self._table = table
        self._ledger = ledger
        self._config = config
        self._counters = counters
        self._key = signing_key(node.key_pair)
        self.crypto = trio.CapacityLimiter(config.crypto_threads)
        self._uploads = Uploads(config.upload_slots, config.upload_window_bytes, config.uplink_bps)  # uploads.py
        self._background: trio.Nursery | None = None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Hold the nursery that exchanges run in (exchange.py: they outlive cancelled attempts)."""
        cpu = self._node.cpu
        trio.lowlevel.add_instrument(cpu)  # the trio thread's CPU by part (cpu.py), for stats()
        cpu.start()
        try:
            async with trio.open_nursery() as nursery:
                self._background = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            trio.lowlevel.remove_instrument(cpu)

    async def run_chunk(self, job: ChunkJob) -> None:
        """Run races until the chunk is accepted, sending, waiting and backing off as its decisions
        say. Raises KeyExposed, NoProvidersError or ChunkFailedError."""
        decisions = job.decisions
        while not decisions.accepted:
            match decisions.next():
                case Wait(seconds):
                    await self._table.wait_change(seconds)
                case Backoff(seconds):
                    await trio.sleep(seconds)
                case Send(state, retry):
                    if retry:
                        self._counters.retries += 1
                    await self._race(job, state)
                    decisions.race_over()

    async def _race(self, job: ChunkJob, first: PeerState) -> None:
        """An attempt at `first` and, if it straggles, at a hedge, until one is accepted or both
        ended. Each attempt starts with its provider's slot taken and gives it back."""
        decisions = job.decisions
        running: dict[ID, float] = {}  # attempts not yet ended by themselves, and when they started

        async def attempt(state: PeerState, done: trio.Event, started: trio.Event, replying: trio.Event) -> None:
            running[state.peer] = trio.current_time()
            try:
                await self._attempt(job, state, on_accept=nursery.cancel_scope.cancel, started=started, replying=replying)
            except AttemptFailed as failure:
                self._count(failure)
                if decisions.failed(failure):
                    raise KeyExposed(failure.peer, failure.reason, job.chunk) from None
            finally:
                decisions.released(state.peer)
                done.set()
            del running[state.peer]  # not reached when cancelled by the winner

        async with trio.open_nursery() as nursery:
            first_done, first_started, first_replying = trio.Event(), trio.Event(), trio.Event()
            nursery.start_soon(attempt, first, first_done, first_started, first_replying)
            await wait_any(first_started, first_done)  # queued behind our own uploads: no hedge clock yet
            # the hedge clock stops, like the deadline, when the reply starts: a big reply downloads
            # at the client's link rate, and a twin would only share that link with it
            with trio.move_on_after(decisions.hedge_after(first)):
                await wait_any(first_done, first_replying)
            if not first_done.is_set() and not first_replying.is_set():
                hedge = decisions.hedge(first)
                if hedge is not None:
                    self._counters.hedges += 1
                    log.info("hedging a chunk of %s: %s is slow, also asking %s", job.layer, first.peer, hedge.peer)
                    nursery.start_soon(attempt, hedge, trio.Event(), trio.Event(), trio.Event())
        now = trio.current_time()
        for peer, since in running.items():
            decisions.straggled(peer, now - since)

    def _count(self, failure: AttemptFailed) -> None:
        """Count a failed attempt in the client's statistics (its penalty is the decisions')."""
        log.debug("attempt failed: %s", failure)
        name = failure.peer.to_base58()
        self._counters.failures_by_peer[name] = self._counters.failures_by_peer.get(name, 0) + 1
        match failure.kind:
            case FailureKind.TIMEOUT | FailureKind.UNREACHABLE:
                self._counters.timeouts += 1
            case FailureKind.BUSY:
                self._counters.busy += 1
            case FailureKind.CHEATED:
                self._counters.verification_failures += 1
                log.warning("banning %s for good: %s", failure.peer, failure.reason)

    async def _attempt(
        self, job: ChunkJob, state: PeerState, *, on_accept: Callable[[], None], started: trio.Event | None = None,
        replying: trio.Event | None = None,
    ) -> None:
        """One exchange with one provider; returns once the result is accepted (or a twin won).
        `started` is set once the upload gate admits it, `replying` once the reply's first bytes
        arrive (exchange.py)."""
        peer = state.peer
        names = group_members(job.layer)
        advert = state.advert  # the advert this attempt acts on: its price is offered and the most a receipt may charge
        price = offer(advert.price_per_gmac, self._config)

        def make_request() -> Sealed[MatmulRequest]:  # called by the exchange when its upload is admitted
            request = MatmulRequest.for_payload(
                job.payload,
                payload_sha256=job.payload_sha256,
                expires_at_ms=now_ms() + int(1000 * self._config.request_ttl_s),
                model_hash=job.need.model_hash,
                layer=names[0],
                group=tuple(names[1:]),
                weight_slice=job.weight_slice,
                transpose=job.channel.transpose,
                backend=BACKEND,
                backend_params=encode_params(job.params),
                input_shape=tuple(job.x.shape),  # type: ignore[arg-type]  # 2-D by construction
                output_shape=(job.x.shape[0], job.width),
                price_per_gmac=price,
            )
            with self._node.cpu.section("signatures"):
                return seal(request, self._key)

        limits = reply_limits(job.params, job.x.shape[0], job.width)
        timeout = job.decisions.timeout(state)
        exchange = Exchange(self._node, peer, make_request, job.payload, limits=limits, timeout_s=timeout,
                            uploads=self._uploads, started=started, replying=replying)
        if self._background is None:
            raise RuntimeError("the dispatcher is not running: start Dispatcher.run in a nursery first")
        self._background.start_soon(exchange.run)
        try:
            try:
                frame = await exchange.reply()
                reply_s = trio.current_time() - exchange.replied_at  # the reply's transfer, first byte to last
            except ExchangeExpired:
                raise AttemptFailed(peer, FailureKind.TIMEOUT, f"no reply within {timeout:.1f} s") from None
            except DeadlineExceeded as exc:
                raise AttemptFailed(peer, FailureKind.TIMEOUT, str(exc)) from None
            except (BaseLibp2pError, OSError, trio.BrokenResourceError, trio.ClosedResourceError, TruncatedFrame) as exc:
                await self._node.disconnect(peer)
                raise AttemptFailed(peer, FailureKind.UNREACHABLE, str(exc) or type(exc).__name__) from None
            except ProtocolError as exc:  # a reply that does not even parse
                raise AttemptFailed(peer, FailureKind.CHEATED, f"invalid reply: {exc}") from None
            sealed = exchange.sealed
            assert sealed is not None  # a reply comes only to a request that was sent
            self._counters.bytes_sent += len(sealed.header) + len(job.payload)
            self._counters.bytes_received += len(frame.header.body) + len(frame.payload)
            digest, spent = await trio.to_thread.run_sync(thread_timed, sha256, frame.payload, limiter=self.crypto)
            self._counters.hash_s += spent
            with self._node.cpu.section("signatures"):
                reply = check_reply(frame, peer=peer, request=sealed, payload_sha256=digest,
                                    advert_price=advert.price_per_gmac)
            try:
                y, (wire_s, decrypt_s, verify_s) = await trio.to_thread.run_sync(
                    _open_result, job, reply.payload, limiter=self.crypto)
                self._counters.wire_s += wire_s
                self._counters.decrypt_s += decrypt_s
                self._counters.verify_s += verify_s
            except FheError as exc:
                raise AttemptFailed(peer, FailureKind.CHEATED, f"wrong result: {exc}") from None
            if job.decisions.accepted:  # a hedge twin was accepted first
                return
            exchange.acknowledge(self._accept(job, reply, y, elapsed_s=exchange.replied_at - exchange.admitted_at,
                                              reply_s=reply_s))
            on_accept()
        finally:
            exchange.abandon()  # a no-op once acknowledged

    def _accept(self, job: ChunkJob, reply: Verified[MatmulReply], y: torch.Tensor, *, elapsed_s: float,
                reply_s: float) -> SignedReceipt:
        """Deliver the verified product and record the countersigned receipt. Synchronous, so no
        other attempt can slip in between the check of `accepted` and this."""
        job.deliver(y)
        assert reply.message.receipt is not None  # verify_reply checked the receipt of an OK reply
        cpu = self._node.cpu
        with cpu.section("signatures"):
            acked = countersign_receipt(reply.message.receipt, self._key)
        with cpu.section("ledger"):
            self._ledger.record(acked, layer=job.layer)
        receipt = acked.receipt
        c = self._counters
        c.chunks += 1
        c.macs += receipt.macs
        c.paid += receipt.amount
        job.decisions.accept(
            ID(reply.signer),
            elapsed_s=elapsed_s,
            compute_s=reply.message.compute_time_us / 1e6,
            macs=job.need.macs,
            amount=receipt.amount,
            payload=len(job.payload),
            reply=len(reply.payload),
            reply_s=reply_s,
        )
        return acked
