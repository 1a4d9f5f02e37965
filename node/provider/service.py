"""The provider service: reads encrypted matmul requests, computes them, signs replies and receipts.

One exchange per stream (protocol README, "Exchange"). Admission and memory: at most
`slots + queue` requests are admitted at once; each is read whole (bounded by
`max_payload_size`) before any work, waits for one of `slots` compute slots, and is computed in a
worker thread so the host keeps serving. A request beyond that is answered BUSY at once, with a
retry hint from the measured compute time, and its bytes are discarded unread, so a provider's
memory stays below about `(slots + queue) * max_payload_size` whatever the load.

Deadlines: every read and write has its own timeout, and the computation must finish before the
request's own expiry (TIMEOUT otherwise; an abandoned computation keeps its slot until its thread
ends, so the slot count stays honest). After the reply the provider waits a bounded time for the
client's countersigned receipt and records it in its ledger.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass
from functools import partial

import torch
import trio
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from cipherswarm.fhe_backend import Ciphertext, FheError, ParameterError, PlainWeights
from cipherswarm.fhe_backend.evaluator import matmul
from cipherswarm.fhe_backend.int8_limbs import Int8Gemm, cuda_int8_gemm, self_check
from cipherswarm.protocol import (
    DEFAULT_MAX_PAYLOAD_SIZE,
    PROTOCOL_IDS,
    Busy,
    CapabilityAdvert,
    DeadlineExceeded,
    Frame,
    Limits,
    MalformedFrame,
    MatmulRequest,
    ProtocolError,
    ReplayWindow,
    ShapeMismatch,
    SignedReceipt,
    TruncatedFrame,
    UnsupportedParams,
    Verified,
    WeightSlice,
    error_reply,
    ok_reply,
    seal,
    sha256,
    verify_receipt_ack,
    verify_request,
)
from cipherswarm.protocol.messages import MAX_ADVERT_LAYERS
from cipherswarm.protocol.stream import READ_CHUNK, read_frame

from ..discovery import Advertiser, now_ms
from ..engine import BACKEND, ENGINE, decode_params
from ..host import NodeHost
from ..ledger import DuplicateReceipt, Ledger
from ..streams import close_stream, send_frame
from ..types import ProviderStats
from ..weights import ModelWeights, group_key
from .benchmark import measure_macs_per_second
from .cheat import Cheat, Cheater

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    """How a provider serves; every field has a default that suits a LAN."""

    price_per_gmac: int = 0  # asked price per 10^9 multiply-accumulates; cheaper offers get PAYMENT
    slots: int = 2  # products computed at once (worker threads)
    queue: int = 2  # further requests read and waiting for a slot; beyond that: BUSY
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE  # largest request payload read, advertised to clients
    device: str = "cpu"  # requested device; see resolve_device
    advert_interval_s: float = 10.0  # re-advertise at least this often (adverts live 3 intervals)
    benchmark_s: float = 1.0  # length of the start-up self-benchmark
    read_timeout_s: float = 10.0  # one read call of a stalled client
    frame_timeout_s: float = 60.0  # one whole frame of a trickling client
    ack_timeout_s: float = 30.0  # wait for the countersigned receipt after the reply
    max_ttl_ms: int = 120_000  # longest request lifetime accepted
    delay_s: float = 0.0  # extra time before each product: a slow link, for tests and the testnet
    cheat: Cheat | None = None  # misbehave on purpose (cheat.py), for tests and the testnet

    def __post_init__(self) -> None:
        if self.slots < 1 or self.queue < 0:
            raise ValueError("slots must be >= 1 and queue >= 0")
        if self.advert_interval_s <= 0 or self.benchmark_s < 0 or self.delay_s < 0:
            raise ValueError("intervals and delays must not be negative")


def resolve_device(requested: str, *, gpu_gemm: Int8Gemm = cuda_int8_gemm) -> str:
    """The device products actually run on. `cuda` computes the int8-limb product with `gpu_gemm`
    (cuBLAS through cupy) only after its start-up self-check reproduced the CPU's float64 product
    bit for bit: a GPU that computes wrong would otherwise fail every client's verification and be
    banned. Without cupy, without a GPU or on any mismatch it logs why and computes on the CPU."""
    if requested not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu or cuda, got {requested!r}")
    if requested == "cpu":
        return "cpu"
    why = self_check(gpu_gemm)
    if why is not None:
        log.warning("--device cuda: the GPU product failed its self-check (%s); computing on the CPU", why)
        return "cpu"
    log.info("--device cuda: the GPU's int8-limb product matches the CPU's bit for bit")
    return "cuda"


class Provider:
    """Serves the held layers of one model on a NodeHost; `serve` runs it."""

    def __init__(
        self,
        *,
        weights: ModelWeights,
        key_pair: KeyPair,
        config: ProviderConfig = ProviderConfig(),
        ledger: Ledger | None = None,
    ) -> None:
        held = weights.held
        if not weights.holds_all and len(held) > MAX_ADVERT_LAYERS:
            raise ValueError(f"an advert lists at most {MAX_ADVERT_LAYERS} layers; hold all layers or fewer")
        self.weights = weights
        self.config = config
        self.device = resolve_device(config.device)
        if self.device == "cuda" and weights.weight_bits > 8:
            log.warning("--device cuda multiplies 8-bit weights only (int8 tensor cores); these are %d-bit: "
                        "computing on the CPU", weights.weight_bits)
            self.device = "cpu"
        self._matmul = partial(matmul, method="int8", gemm=cuda_int8_gemm) if self.device == "cuda" else ENGINE.matmul
        self.macs_per_second = 0  # set by the benchmark in serve()
        self._key = key_pair.private_key
        self._ledger = ledger
        self._cheater = None if config.cheat is None else Cheater(config.cheat)
        self._layer_digests = () if weights.holds_all else tuple(layer.digest for layer in held)
        self._window = ReplayWindow(max_ttl_ms=config.max_ttl_ms)
        self._limits = Limits(max_payload_size=config.max_payload_size)
        self._limiter = trio.CapacityLimiter(config.slots)
        self._admitted = 0
        self._compute_s = 0.1  # moving average of one product, for BUSY retry hints
        self._stats = ProviderStats()
        self._advertiser: Advertiser | None = None

    def statistics(self) -> ProviderStats:
        return dataclasses.replace(self._stats, in_flight=self._admitted)

    def _bump(self, **deltas: int) -> None:
        s = self._stats
        self._stats = dataclasses.replace(s, **{k: getattr(s, k) + v for k, v in deltas.items()})

    async def serve(self, node: NodeHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Benchmark, register the stream handlers, advertise; `started()` once requests are served."""
        self.macs_per_second = await trio.to_thread.run_sync(
            partial(measure_macs_per_second, self.config.benchmark_s, product=self._matmul)
        )
        log.info("encrypted throughput %.3g MAC/s on %s", self.macs_per_second, self.device)
        for protocol_id in PROTOCOL_IDS:
            node.host.set_stream_handler(protocol_id, self._handle)
        self._advertiser = Advertiser(
            node, partial(self._advert, node), model_hashes=[self.weights.model_hash], interval_s=self.config.advert_interval_s
        )
        async with trio.open_nursery() as nursery:
            await nursery.start(self._advertiser.run)
            task_status.started()
            await trio.sleep_forever()

    def _advert(self, node: NodeHost) -> CapabilityAdvert:
        issued = now_ms()
        return CapabilityAdvert(
            protocols=PROTOCOL_IDS,
            addrs=tuple(addr.to_bytes() for addr in node.transport_addrs()),
            models=(self.weights.model_hash,),
            backends=(BACKEND,),
            device=self.device,
            macs_per_second=self.macs_per_second,
            price_per_gmac=self.config.price_per_gmac,
            free_slots=max(0, self.config.slots - self._admitted),
            max_payload_size=self.config.max_payload_size,
            issued_at_ms=issued,
            expires_at_ms=issued + int(3000 * self.config.advert_interval_s),
            layers=self._layer_digests,
        )

    def _admission_changed(self, delta: int) -> None:
        self._admitted += delta
        if self._admitted > self._stats.peak_in_flight:
            self._stats = dataclasses.replace(self._stats, peak_in_flight=self._admitted)
        if self._advertiser is not None:
            self._advertiser.changed()

    # -- one stream ----------------------------------------------------------------------------

    async def _handle(self, stream: INetStream) -> None:
        """Stream handler. It runs in libp2p's connection nursery, where an exception would tear
        the whole connection down, so every failure ends here, logged, with the stream closed."""
        peer = stream.muxed_conn.peer_id
        self._bump(requests=1)
        try:
            if self._admitted >= self.config.slots + self.config.queue:
                await self._refuse_busy(stream)
                return
            self._admission_changed(+1)
            try:
                await self._exchange(stream, peer)
            finally:
                self._admission_changed(-1)
        except (BaseLibp2pError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            # the client went away, reset the stream (a hedge it no longer needs), or stopped reading
            log.debug("exchange with %s ended: %s", peer, exc)
        except Exception:
            log.exception("request from %s failed", peer)
        finally:
            await close_stream(stream)

    async def _refuse_busy(self, stream: INetStream) -> None:
        self._bump(busy=1)
        waiting = self._admitted - self.config.slots + 1
        retry_ms = max(50, int(1000 * self._compute_s * waiting / self.config.slots))
        reply = error_reply(Busy(retry_ms, "all slots taken"))
        await send_frame(stream, seal(reply, self._key), timeout_s=self.config.read_timeout_s)
        with trio.move_on_after(self.config.read_timeout_s):  # discard the request until the client hangs up
            while await stream.read(READ_CHUNK):
                pass

    async def _exchange(self, stream: INetStream, peer: ID) -> None:
        frame: Frame | None = None
        try:
            frame = await read_frame(
                stream,
                limits=self._limits,
                read_timeout_s=self.config.read_timeout_s,
                frame_timeout_s=self.config.frame_timeout_s,
            )
            # hashed in a worker thread: a layer-sized payload takes tens of ms, which on the event
            # loop would stall every other stream this provider serves
            digest = await trio.to_thread.run_sync(sha256, frame.payload)
            request = verify_request(
                frame,
                peer=peer,
                payload_sha256=digest,
                window=self._window,
                lookup=self.weights.lookup,
                now_ms=now_ms(),
                min_price_per_gmac=self.config.price_per_gmac,
            )
            remaining_s = (request.message.expires_at_ms - now_ms()) / 1000
            with trio.move_on_after(remaining_s) as scope:
                payload, reply_digest, compute_us = await self._compute(request)
            if scope.cancelled_caught:
                raise DeadlineExceeded("computation", timeout_s=remaining_s)
        except ProtocolError as exc:
            if isinstance(exc, TruncatedFrame) and exc.is_clean_close:
                return
            self._bump(errors=1)
            await send_frame(stream, seal(error_reply(exc, frame), self._key), timeout_s=self.config.read_timeout_s)
            return
        reply = ok_reply(
            request,
            payload,
            key=self._key,
            price_per_gmac=self.config.price_per_gmac,
            compute_time_us=compute_us,
            now_ms=now_ms(),
            payload_sha256=reply_digest,
        )
        await send_frame(stream, seal(reply, self._key), payload, timeout_s=self.config.frame_timeout_s)
        assert reply.receipt is not None  # ok_reply always signs one
        self._bump(served=1, macs=request.message.macs, earned=reply.receipt.receipt.amount)
        await self._await_ack(stream, peer, reply.receipt, group_key(request.message.layers))

    async def _await_ack(self, stream: INetStream, peer: ID, issued: SignedReceipt, layer: str) -> None:
        try:
            frame = await read_frame(
                stream,
                limits=Limits(max_payload_size=0),
                read_timeout_s=self.config.ack_timeout_s,
                frame_timeout_s=self.config.ack_timeout_s,
            )
            ack = verify_receipt_ack(frame, peer=peer, issued=issued)
        except ProtocolError as exc:  # no ack (the protocol makes it optional) or a bad one
            log.debug("no countersigned receipt from %s: %s", peer, exc)
            return
        self._bump(acks=1)
        if self._ledger is not None:
            try:
                self._ledger.record(ack, layer=layer)
            except DuplicateReceipt:
                log.warning("%s acknowledged request %s twice", peer, issued.receipt.request_id.hex())

    # -- the product ---------------------------------------------------------------------------

    async def _compute(self, request: Verified[MatmulRequest]) -> tuple[bytes, bytes, int]:
        """The encrypted result's bytes, their SHA-256 and the compute time in microseconds."""
        msg = request.message
        ct, weights = await trio.to_thread.run_sync(self._prepare, msg, request.payload)
        if self.config.delay_s:
            await trio.sleep(self.config.delay_s)
        kind = (msg.layers, msg.weight_slice, msg.transpose, msg.input_shape)
        payload, digest, seconds = await trio.to_thread.run_sync(
            partial(self._multiply, ct, weights, msg.transpose, kind), limiter=self._limiter, abandon_on_cancel=True
        )
        self._compute_s = 0.8 * self._compute_s + 0.2 * seconds
        return payload, digest, int(seconds * 1e6)

    def _prepare(self, msg: MatmulRequest, payload: bytes) -> tuple[Ciphertext, PlainWeights]:
        """Worker thread: parse the ciphertext and check it, the parameters and the weights agree."""
        if msg.backend != BACKEND:
            raise UnsupportedParams("not served here", backend=msg.backend)
        params = decode_params(msg.backend_params)
        try:
            ct = Ciphertext.from_bytes(payload)
        except FheError as exc:
            raise MalformedFrame(f"payload is not a {BACKEND} ciphertext: {exc}") from None
        if ct.params != params:
            raise UnsupportedParams("the ciphertext's parameters differ from the request's", backend=BACKEND)
        if (ct.tokens, ct.d) != msg.input_shape:
            raise ShapeMismatch("ciphertext does not match input_shape", expected=msg.input_shape, got=(ct.tokens, ct.d))
        weights = self._slice(msg.layers, msg.weight_slice)
        try:
            params.for_weights(weights.stats(msg.transpose))
        except ParameterError as exc:
            raise UnsupportedParams(str(exc), backend=BACKEND) from None
        return ct, weights if self._cheater is None else self._cheater.weights(weights)

    def _slice(self, layers: tuple[str, ...], part: WeightSlice) -> PlainWeights:
        """W[rows, cols] of the layers' column concatenation (checked against its shape by
        verify_request): a held layer whole is the prepared one, anything else a copy of the slice."""
        rows = slice(part.rows.start, part.rows.stop)
        pieces, offset = [], 0
        for name in layers:
            full = self.weights.plain(name)
            d_in, d_out = full.w.shape
            lo, hi = max(part.cols.start - offset, 0), min(part.cols.stop - offset, d_out)
            if len(layers) == 1 and (rows.start, rows.stop, lo, hi) == (0, d_in, 0, d_out):
                return full
            if lo < hi:
                pieces.append(full.w[rows, lo:hi])
            offset += d_out
        return PlainWeights(pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1))

    def _multiply(self, ct: Ciphertext, weights: PlainWeights, transpose: bool, kind: object) -> tuple[bytes, bytes, float]:
        """Worker thread, holding a slot: the product's serialization (timed) and its SHA-256."""
        start = time.perf_counter()
        result = self._matmul(ct, weights, transpose=transpose)
        if self._cheater is not None:
            result = self._cheater.result(kind, result)
        payload = result.to_bytes()
        seconds = time.perf_counter() - start
        return payload, sha256(payload), seconds
