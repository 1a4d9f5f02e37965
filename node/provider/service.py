"""The provider service: reads encrypted matmul requests, computes them, signs replies and receipts.

One exchange per stream (protocol README, "Exchange"), read and checked in the order of the README's
section 8, so that nothing unauthenticated holds anything scarce:

1. *Opening* (admission.py's `opening` pool, not a compute place): the length prefix and the signed
   header are read under `header_timeout_s` from the stream's opening. At most `max_opening`
   streams read their header at once (a new one evicts the oldest), `max_opening_per_peer` of one
   peer id and `max_opening_per_address` of one address; over a share: BUSY.
2. The header's checks, none of which needs the payload: signature and peer binding, expiry, model
   and layers held, shapes and a contraction of at least `min_contraction` features, price (at
   least pricing.py's floor: a price advertised within two advert intervals is honoured), the
   backend's name and parameters, a `payload_length` that is exactly the ciphertext the shape
   needs, and a reply within `max_output_elements` and `max_reply_size` (what the product would
   allocate and send, known from the header: refused before anything is allocated); then the nonce
   is recorded (per-key and per-address shares of the replay window). A refused request is answered
   at once and its payload never read.
3. *Admission*: first the peer's credit (admission.py's `Credit`, advertised): at most
   `max_unacked` requests and `max_unacked_gmacs` of work admitted and not yet acknowledged by a
   countersigned receipt (held until the receipt, or `ack_timeout_s` after the reply); over: BUSY,
   with the time until its oldest receipt's deadline, the payload unread. Then a place (the
   `places` pool): `slots + queue` places, at most `max_per_peer` (default: `slots`)
   of one peer id and `max_per_address` of one address; over: BUSY, the payload unread.
4. The payload is read at no less than `min_upload_rate` on average (after `header_timeout_s` of
   grace from the stream's opening), hashed in a worker thread and checked against the header; the
   ciphertext is parsed and checked against the parameters and the weights; the request waits for
   one of `slots` compute slots and is computed in a worker thread, so the host keeps serving. The
   computation must finish before the request's own expiry (TIMEOUT otherwise; an abandoned
   computation keeps its slot until its thread ends, so the slot count stays honest).
5. The reply is written, and the place given back *before* waiting for the client's countersigned
   receipt: the wait (the `acks` pool, `max_ack_waiters`, the oldest dropped when full) holds no
   place.

A refused stream whose payload may still be coming is drained (read and discarded) for at most
`header_timeout_s`, so that an honest client can finish its write and read the answer. Memory: the
requests' own bytes stay below about `(slots + queue) * max_payload_size` whatever the load, as only
admitted requests read their payload, and each product's output below about `16 *
max_output_elements + 2 * max_reply_size` (its int64 words, their serialization and the reply's bytes).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from types import MappingProxyType
from typing import Literal

import torch
import trio
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.exceptions import BaseLibp2pError
from libp2p.peer.id import ID

from cipherswarm.fhe_backend import Ciphertext, FheError, ParameterError, PlainWeights
from cipherswarm.fhe_backend.ciphertext import ciphertext_size, result_size
from cipherswarm.fhe_backend.evaluator import matmul, output_elements
from cipherswarm.fhe_backend.int8_limbs import Int8Gemm, cpu_int8_gemm, cuda_int8_gemm
from cipherswarm.fhe_backend.selfcheck import self_check
from cipherswarm.protocol import (
    ADVERT_PROTOCOL_ID,
    DEFAULT_MAX_PAYLOAD_SIZE,
    DEFAULT_MAX_TTL_MS,
    PROTOCOL_IDS,
    STREAM_PROTOCOL_ID,
    Busy,
    CapabilityAdvert,
    DeadlineExceeded,
    FrameTooLarge,
    Header,
    Limits,
    MalformedFrame,
    MatmulRequest,
    PayloadTooLarge,
    ProtocolError,
    ReplayWindow,
    ReplyTooLarge,
    ShapeMismatch,
    SignedReceipt,
    TruncatedFrame,
    UnsupportedParams,
    Verified,
    WeightSlice,
    error_reply,
    frame_head,
    ok_reply,
    reply_trailer,
    seal,
    sha256,
    streamed_reply,
    verify_receipt_ack,
)
from cipherswarm.protocol.exchange import check_request_header, check_request_payload
from cipherswarm.protocol.messages import MAX_ADVERT_LAYERS

from ..discovery import Advertiser, now_ms
from ..engine import BACKEND, decode_params
from ..errors import leaf_errors
from ..host import NodeHost
from ..identity import signing_key
from ..ledger import DuplicateReceipt, Ledger
from ..streams import READ_CHUNK, FrameHead, close_stream, read_frame, read_header, read_payload, send_bytes, send_frame
from ..types import ProviderStats
from ..weights import ModelWeights, group_key
from .admission import Credit, Pool, Ticket, address_key, remote_address
from .pricing import RAMP_S, Pricing
from .benchmark import measure_macs_per_second
from .cheat import Cheat, Cheater
from .gate import StreamGate
from .product import Product

log = logging.getLogger(__name__)

#: how far (in seconds of the minimum rate, counted from admission) an admitted request's payload
#: may lag before its place can go to a newcomer: an honest client writes its payload right after
#: its header, faster than the minimum rate, so its first read (up to 1 MiB, what its stream has
#: buffered) is ahead at once; 0.1 s absorbs a busy event loop and leaves a trickler little time
LAG_SLACK_S = 0.1
#: how an exchange ends when the client goes away, resets the stream or stops reading: not a fault here
STREAM_ENDED = (BaseLibp2pError, ProtocolError, trio.BrokenResourceError, trio.ClosedResourceError)
#: peers benched at once for a lagging upload (a few dozen bytes each)
MAX_LAGGARDS = 4_096


class _Upload:
    """An admitted request's stream while its payload is read, counting the bytes received."""

    __slots__ = ("_stream", "admitted", "received")

    def __init__(self, stream: INetStream, admitted: float) -> None:
        self._stream = stream
        self.admitted = admitted
        self.received = 0

    async def read(self, n: int) -> bytes:
        data = await self._stream.read(n)
        self.received += len(data)
        return data


@dataclass(frozen=True, kw_only=True)
class ProviderConfig:
    """How a provider serves; every field has a default that suits a LAN."""

    price_per_gmac: int = 0  # asked price per 10^9 multiply-accumulates (the start, if dynamic); cheaper offers get PAYMENT
    # a dynamic price (pricing.py) moves between these with the load; None (both): price_per_gmac, fixed
    min_price_per_gmac: int | None = None
    max_price_per_gmac: int | None = None
    price_ramp_s: float = RAMP_S  # seconds of saturation from the lowest price to the highest (and of idleness back)
    slots: int = 2  # products computed at once (worker threads)
    queue: int = 2  # further requests read and waiting for a slot; beyond that: BUSY
    max_payload_size: int = DEFAULT_MAX_PAYLOAD_SIZE  # largest request payload read, advertised to clients
    device: str = "cpu"  # requested device; see resolve_device
    advert_interval_s: float = 10.0  # re-advertise at least this often (adverts live 3 intervals)
    benchmark_s: float = 1.0  # length of the start-up self-benchmark
    read_timeout_s: float = 10.0  # one read call of a stalled client
    frame_timeout_s: float = 60.0  # most time from a stream's opening to its payload's last byte; also caps a reply's write
    # Reading with hard limits (protocol README, section 2). An honest header (a few KiB) arrives in
    # milliseconds; 5 s leaves room for a loaded host. 1 MB/s (8 Mbit/s) is the rate clients already
    # demand of replies (client/exchange.py, MIN_REPLY_BPS), and a trickler has to send that much to
    # keep a place; the old frame deadline (60 s for up to 512 MiB) asked up to 9 MB/s of large payloads.
    header_timeout_s: float = 5.0  # a request's length prefix and header, from the stream's opening; also a refused stream's drain
    min_upload_rate: float = 1e6  # bytes/s a payload must average, after header_timeout_s of grace from the stream's opening
    # Admission (admission.py). Streams reading their header hold no compute place: they have their own pool.
    max_opening: int = 64  # streams reading their header at once; one more evicts the oldest
    max_opening_per_peer: int = 8  # ... from one peer id; more get BUSY
    max_opening_per_address: int = 32  # ... from one address (IPv6: one /64); more get BUSY
    max_per_peer: int | None = None  # admitted requests of one peer id at once (None: slots); more get BUSY
    max_per_address: int | None = None  # ... from one address (None: slots + queue - 1, at least 1: never every place)
    exempt_loopback: bool = True  # no per-address caps for loopback peers (every local process is 127.0.0.1)
    ack_timeout_s: float = 30.0  # wait for the countersigned receipt after the reply (holding no place)
    # Credit (admission.Credit), advertised: work given to one peer id and not yet acknowledged by a
    # countersigned receipt, from admission until the receipt or ack_timeout_s after the reply. An
    # honest client holds at most `slots` requests here and acknowledges each within seconds; 16 of
    # an 8B model's widest one-block calls are ~2,000 GMACs.
    max_unacked: int = 16  # requests of one peer id admitted and not yet acknowledged; more get BUSY
    max_unacked_gmacs: int = 4_096  # ... their multiply-accumulates, in 10^9; more get BUSY (unless none are outstanding)
    max_ack_waiters: int = 64  # replies waiting for their receipt at once; one more drops the oldest wait
    max_ttl_ms: int = DEFAULT_MAX_TTL_MS  # longest request lifetime accepted, advertised
    # What one request may ask (protocol README, section 8), advertised and checked from the header,
    # before the payload is read or anything allocated. One 2048-token block of LLaMA-3-8B's widest
    # layer (14,336 columns, 29.4 M elements) fits; the router cuts columns where a block does not.
    max_output_elements: int = 1 << 25  # result elements computed (blocks x n x width): 16 B each while computed, 512 MiB
    max_reply_size: int = 1 << 28  # reply payload bytes sent: 256 MiB, 8 B per element of the largest output
    # A request contracting over fewer features (unless its layer has fewer) is refused: a thin slice
    # costs its sender a sliver of payload and this provider a full-width product and reply. 1024
    # keeps a reply within ~17x its payload per token at 14,336 columns, and the router's row parts
    # of real models hold thousands of features.
    min_contraction: int = 1024
    # Replay window (protocol/replay.py): nonces live until their request expires, at most max_ttl_ms.
    replay_capacity: int = 65_536  # nonces remembered at once, about 20 MB; more: BUSY for everyone
    replay_per_key: int = 4_096  # ... of one signing key (68 requests/s of 60 s lifetime); more: BUSY for that key
    replay_per_address: int = 16_384  # ... from one address; more: BUSY for that address
    # The gate (gate.py): a peer refused `strikes` times in a row, none served since, may open
    # `struck_streams_per_s` streams a second, all such peers together `struck_streams_shared_per_s`;
    # its other streams are reset before protocol negotiation. Honest clients are refused rarely
    # (they follow BUSY's retry hints); a flood of refused streams costs the loop little.
    strikes: int = 3
    struck_streams_per_s: float = 1.0
    struck_streams_shared_per_s: float = 16.0
    delay_s: float = 0.0  # extra time before each product: a slow link, for tests and the testnet
    cheat: Cheat | None = None  # misbehave on purpose (cheat.py), for tests and the testnet

    def __post_init__(self) -> None:
        if self.slots < 1 or self.queue < 0:
            raise ValueError("slots must be >= 1 and queue >= 0")
        if (self.min_price_per_gmac is None) != (self.max_price_per_gmac is None):
            raise ValueError("a dynamic price needs both min_price_per_gmac and max_price_per_gmac")
        self.pricing(clock=lambda: 0.0)  # the price range and ramp, validated
        if self.advert_interval_s <= 0 or self.benchmark_s < 0 or self.delay_s < 0:
            raise ValueError("intervals and delays must not be negative")
        if self.header_timeout_s <= 0 or self.min_upload_rate <= 0:
            raise ValueError("header_timeout_s and min_upload_rate must be positive")
        caps = (self.max_opening, self.max_opening_per_peer, self.max_opening_per_address, self.max_ack_waiters,
                self.replay_capacity, self.replay_per_key, self.replay_per_address, self.peer_share, self.address_share,
                self.max_ttl_ms, self.max_output_elements, self.max_reply_size, self.min_contraction,
                self.max_unacked, self.max_unacked_gmacs, self.strikes)
        if min(caps) < 1:
            raise ValueError("every cap must be at least 1")
        if self.struck_streams_per_s <= 0 or self.struck_streams_shared_per_s <= 0:
            raise ValueError("the struck peers' stream rates must be positive")

    def pricing(self, *, clock: Callable[[], float] = trio.current_time) -> Pricing:
        """The asked price's rule (pricing.py): fixed at price_per_gmac, or starting there and moving
        within the range; prices advertised within two advert intervals are honoured."""
        low = self.price_per_gmac if self.min_price_per_gmac is None else self.min_price_per_gmac
        high = self.price_per_gmac if self.max_price_per_gmac is None else self.max_price_per_gmac
        return Pricing(low=low, high=high, start=self.price_per_gmac, ramp_s=self.price_ramp_s,
                       honour_s=2 * self.advert_interval_s, clock=clock)

    @property
    def peer_share(self) -> int:
        """Admitted requests one peer id may hold at once."""
        return self.slots if self.max_per_peer is None else self.max_per_peer

    @property
    def address_share(self) -> int:
        """Admitted requests one (non-exempt) address may hold at once."""
        return max(1, self.slots + self.queue - 1) if self.max_per_address is None else self.max_per_address


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
        self._method, self._gemm = ("int8", cuda_int8_gemm) if self.device == "cuda" else ("f64", cpu_int8_gemm)
        self._matmul = partial(matmul, method=self._method, gemm=self._gemm)
        self.macs_per_second = 0  # set by the benchmark in serve()
        self._key = signing_key(key_pair)
        self._ledger = ledger
        self._cheater = None if config.cheat is None else Cheater(config.cheat)
        self._layer_digests = () if weights.holds_all else tuple(layer.digest for layer in held)
        self.window = ReplayWindow(  # nonces of the requests that passed the header's checks
            capacity=config.replay_capacity, max_ttl_ms=config.max_ttl_ms, per_scope=config.replay_per_key,
            per_group=config.replay_per_address,
        )
        self._limits = Limits(max_payload_size=config.max_payload_size)
        self._limiter = trio.CapacityLimiter(config.slots)
        # admission.py: streams reading their header, admitted requests, replies waiting for their ack
        self.opening = Pool("opening", capacity=config.max_opening, per_peer=config.max_opening_per_peer,
                            per_address=config.max_opening_per_address, evict_oldest=True)
        self.places = Pool("places", capacity=config.slots + config.queue, per_peer=config.peer_share,
                           per_address=config.address_share)
        self.acks = Pool("acks", capacity=config.max_ack_waiters, evict_oldest=True)
        self.credit = Credit(count=config.max_unacked, macs=config.max_unacked_gmacs * 10**9, hold_s=config.ack_timeout_s)
        self.pricing = config.pricing()  # the asked price: fixed, or moving with the load (pricing.py)
        self._uploads: dict[Ticket, _Upload] = {}  # admitted requests reading their payload
        self._laggards: dict[ID, float] = {}  # peer -> until when it is benched (_bench), earliest first
        self._draining = 0  # refused streams being drained
        self._compute_s = 0.1  # moving average of one product, for BUSY retry hints
        self._stats = ProviderStats()
        self._rejected: Counter[str] = Counter()  # refusals by wire error code, for rejections()
        self._advertiser: Advertiser | None = None
        self.gate = StreamGate(strikes=config.strikes, rate=config.struck_streams_per_s,
                               shared_rate=config.struck_streams_shared_per_s)

    def statistics(self) -> ProviderStats:
        return dataclasses.replace(self._stats, in_flight=len(self.places))

    def rejections(self) -> Mapping[str, int]:
        """Requests refused so far, by reason (the wire error code's name, e.g. "busy", "bad_frame",
        and "gate" for streams reset before negotiation, gate.py): a read-only copy, so that a
        dashboard tells a flood of BUSY from forged or stale requests."""
        return MappingProxyType({**self._rejected, **({"gate": self.gate.turned_away} if self.gate.turned_away else {})})

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
        self.gate.install(node.host)
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
            protocols=(*PROTOCOL_IDS, ADVERT_PROTOCOL_ID),
            addrs=tuple(addr.to_bytes() for addr in node.transport_addrs()),
            models=(self.weights.model_hash,),
            backends=(BACKEND,),
            device=self.device,
            macs_per_second=self.macs_per_second,
            price_per_gmac=self._advertised_price(),
            free_slots=max(0, self.config.slots - len(self.places)),
            max_payload_size=self.config.max_payload_size,
            issued_at_ms=issued,
            expires_at_ms=issued + int(3000 * self.config.advert_interval_s),
            layers=self._layer_digests,
            max_reply_size=self.config.max_reply_size,
            max_output_elements=self.config.max_output_elements,
            min_contraction=self.config.min_contraction,
            max_ttl_ms=self.config.max_ttl_ms,
            max_unacked=self.config.max_unacked,
            max_unacked_gmacs=self.config.max_unacked_gmacs,
        )

    def _advertised_price(self) -> int:
        """The price an advert being built asks, as the load now sets it (remembered, to be honoured)."""
        self.pricing.observe(self._load())
        return self.pricing.advertise()

    def _load(self) -> float:
        """How full this provider is, for its price: admitted requests per compute slot, or the
        largest share of its unacknowledged credit one client holds, whichever is larger."""
        return max(len(self.places) / self.config.slots, self.credit.load(now=trio.current_time()))

    def _admission_changed(self) -> None:
        self.pricing.observe(self._load())
        admitted = len(self.places)
        if admitted > self._stats.peak_in_flight:
            self._stats = dataclasses.replace(self._stats, peak_in_flight=admitted)
        if self._advertiser is not None:
            self._advertiser.changed()

    def _retry_ms(self) -> int:
        """BUSY's retry hint: the measured compute time of the requests ahead."""
        waiting = max(1, len(self.places) - self.config.slots + 1)
        return max(50, int(1000 * self._compute_s * waiting / self.config.slots))

    # -- one stream ----------------------------------------------------------------------------

    async def _handle(self, stream: INetStream) -> None:
        """Stream handler. It runs in libp2p's connection nursery, where an exception would tear
        the whole connection down, so every failure ends here, logged, with the stream closed."""
        opened = trio.current_time()
        peer = stream.muxed_conn.peer_id
        address = address_key(remote_address(stream), exempt_loopback=self.config.exempt_loopback)
        self._bump(requests=1)
        try:
            issued = await self._exchange(stream, peer, address, opened)
            if issued is not None:
                await self._await_ack(stream, peer, *issued)
        except STREAM_ENDED as exc:
            # the client went away, reset the stream (a hedge it no longer needs), or stopped reading
            log.debug("exchange with %s ended: %s", peer, exc)
        except Exception:
            log.exception("request from %s failed", peer)
        finally:
            await close_stream(stream)

    async def _exchange(self, stream: INetStream, peer: ID, address: str | None,
                        opened: float) -> tuple[SignedReceipt, str, int] | None:
        """Read, check, admit, compute and answer one request (module docstring). The receipt issued,
        the layer key and the request's credit entry (settled: held until the receipt's deadline),
        or None if the request was refused or failed (and answered if it could be)."""
        head = await self._read_head(stream, peer, address)
        if head is None:
            return None
        try:
            request = check_request_header(
                head.header,
                peer=peer.to_bytes(),
                window=self.window,
                lookup=self.weights.lookup,
                now_ms=now_ms(),
                min_price_per_gmac=self.pricing.floor(),
                min_contraction=self.config.min_contraction,
                group=None if address is None else address.encode(),
                check=self._check_request,
            )
        except ProtocolError as exc:
            await self._refuse(stream, exc, head.header, then="drain" if head.payload_length else "close")
            return None
        then: Literal["close", "drain"] = "drain" if head.payload_length else "close"
        if (benched_s := self._laggards.get(peer, -math.inf) - trio.current_time()) > 0:
            await self._refuse(stream, Busy(math.ceil(1000 * benched_s), "an upload of this peer lagged"), head.header,
                               then=then)
            return None
        entry = self.credit.take(peer, request.message.macs, now=trio.current_time())
        if entry is None:
            wait_s = self.credit.retry_s(peer, now=trio.current_time())
            retry_ms = self._retry_ms() if wait_s == math.inf else max(50, math.ceil(1000 * wait_s))
            await self._refuse(stream, Busy(retry_ms, "too many unacknowledged replies"), head.header, then=then)
            return None
        place = self.places.enter(peer, address, evictable=self._lagging)
        if place is None:
            self.credit.release(peer, entry)
            await self._refuse(stream, Busy(self._retry_ms(), "no place for this request"), head.header, then=then)
            return None
        self._admission_changed()
        issued = None
        try:
            issued = await self._serve(stream, request, head, opened, place)
        finally:  # the place is given back before the wait for the ack; the credit once acknowledged
            place.release()
            self._admission_changed()
            if issued is None:
                self.credit.release(peer, entry)
            else:
                self.credit.settle(peer, entry, now=trio.current_time())
        if issued is None:
            return None
        self.gate.served(peer)
        return (*issued, entry)

    async def _read_head(self, stream: INetStream, peer: ID, address: str | None) -> FrameHead | None:
        """The request's header, read in the opening pool under the header deadline; None if the
        stream was refused, closed, too slow or evicted (answered where that makes sense)."""
        ticket = self.opening.enter(peer, address)
        if ticket is None:
            await self._refuse(stream, Busy(self._retry_ms(), "too many streams opening"), None, then="drain")
            return None
        head: FrameHead | None = None
        try:
            with ticket.scope:
                head = await read_header(stream, limits=self._limits, timeout_s=self.config.header_timeout_s)
        except ProtocolError as exc:
            if isinstance(exc, TruncatedFrame) and exc.is_clean_close:
                return None
            # a client sending an oversized request may be writing it still; a slow or garbled one
            # gets no more time; one that hung up inside the header gets a reply it will not read
            then = "drain" if isinstance(exc, FrameTooLarge) else "close" if isinstance(exc, TruncatedFrame) else "reset"
            await self._refuse(stream, exc, exc.header if isinstance(exc, PayloadTooLarge) else None, then=then)
            return None
        finally:
            ticket.release()
        if head is None:  # evicted: the oldest of too many streams reading their header
            await self._refuse(stream, Busy(self._retry_ms(), "too many streams opening"), None, then="reset")
            return None
        return head

    async def _refuse(self, stream: INetStream, exc: ProtocolError, header: Header | None, *,
                      then: Literal["close", "drain", "reset"]) -> None:
        """Answer `exc`, then: `close` (the handler closes the stream: the client has sent all it
        will), `drain` (the client may still be writing the request: see _drain) or `reset` (a
        client too slow, garbled or evicted: stop its stream, so that nothing it still sends is
        buffered for a stream nobody reads)."""
        self._bump(**({"busy": 1} if isinstance(exc, Busy) else {"errors": 1}))
        self._rejected[exc.code.name.lower()] += 1
        self.gate.refused(stream.muxed_conn.peer_id)
        reply = error_reply(exc, header)
        try:
            await send_frame(stream, seal(reply, self._key), timeout_s=self.config.header_timeout_s)
        except BaseException:  # the client went away or does not read: nothing more to do
            await close_stream(stream, reset=True)
            raise
        if then == "reset" or (then == "drain" and not await self._drain(stream)):
            # FIN first: py-libp2p's reader still hands out the reply buffered before the RST, as
            # long as its side has not failed a write on the reset stream first
            await close_stream(stream)
            await close_stream(stream, reset=True)

    async def _drain(self, stream: INetStream) -> bool:
        """Discard what the client still sends until it hangs up, for at most header_timeout_s: an
        honest client stops writing once it reads the refusal, but its write in flight must be
        able to finish (py-libp2p's writer waits for window the reader gives back). At most
        max_opening streams drain at once. False if the client did not hang up in time (or too
        many drain): reset the stream then."""
        if self._draining >= self.config.max_opening:
            return False
        self._draining += 1
        try:
            with trio.move_on_after(self.config.header_timeout_s):
                while await stream.read(READ_CHUNK):
                    pass
                return True
            return False
        except (BaseLibp2pError, EOFError, trio.BrokenResourceError, trio.ClosedResourceError):
            return True  # the client hung up
        finally:
            self._draining -= 1

    def _bench(self, peer: ID) -> None:
        """`peer`'s upload lagged (its place was given away, or it missed the minimum rate): its next
        requests get BUSY at admission for header_timeout_s, so that identities trickling payloads
        cannot keep taking turns at the places. At most MAX_LAGGARDS peers are benched, the
        earliest dropped first."""
        now = trio.current_time()
        self._laggards.pop(peer, None)
        self._laggards[peer] = now + self.config.header_timeout_s
        while len(self._laggards) > MAX_LAGGARDS:
            del self._laggards[next(iter(self._laggards))]

    def _lagging(self, place: Ticket) -> bool:
        """Whether an admitted request's payload lags more than LAG_SLACK_S behind the minimum rate,
        counted from its admission: its place may go to a newcomer (admission.py, `places`)."""
        upload = self._uploads.get(place)
        return upload is not None and upload.received < self.config.min_upload_rate * (
            trio.current_time() - upload.admitted - LAG_SLACK_S)

    async def _serve(self, stream: INetStream, request: Verified[MatmulRequest], head: FrameHead,
                     opened: float, place: Ticket) -> tuple[SignedReceipt, str] | None:
        """Holding `place`: read the payload (the place evictable while it lags), check it, compute, reply."""
        cfg = self.config
        try:
            expires_in_s = (request.message.expires_at_ms - now_ms()) / 1000
            upload = self._uploads[place] = _Upload(stream, trio.current_time())
            try:
                with place.scope:
                    payload = await read_payload(
                        upload,
                        head,
                        min_rate=cfg.min_upload_rate,
                        grace_s=cfg.header_timeout_s,
                        read_timeout_s=cfg.read_timeout_s,
                        start=opened,
                        not_after=min(opened + cfg.frame_timeout_s, trio.current_time() + expires_in_s),
                    )
            finally:
                del self._uploads[place]
            if place.evicted:
                raise Busy(self._retry_ms(), "place given to a faster upload")
            # hashed in a worker thread: a layer-sized payload takes tens of ms, which on the event
            # loop would stall every other stream this provider serves
            digest = await trio.to_thread.run_sync(sha256, payload)
            request = check_request_payload(request, payload, payload_sha256=digest)
            remaining_s = (request.message.expires_at_ms - now_ms()) / 1000
            streamed = stream.get_protocol() == STREAM_PROTOCOL_ID
            with trio.move_on_after(remaining_s) as scope:
                product = await trio.to_thread.run_sync(self._prepare, request.message, request.payload)
                request = dataclasses.replace(request, payload=b"")  # parsed: the bytes are not needed again
                if cfg.delay_s:
                    await trio.sleep(cfg.delay_s)
                # the first block before anything is sent: a failure so far still gets its typed reply
                pieces = [await self._compute(product)]
                while not streamed and not product.done:
                    pieces.append(await self._compute(product))
            if scope.cancelled_caught:
                raise DeadlineExceeded("computation", timeout_s=remaining_s)
        except ProtocolError as exc:
            # too slow sending its payload: stop reading it, and bench the peer
            too_slow = isinstance(exc, Busy) or (isinstance(exc, DeadlineExceeded) and exc.what != "computation")
            if too_slow:
                self._bench(ID(request.signer))
            await self._refuse(stream, exc, head.header, then="reset" if too_slow else "close")
            return None
        price = self.pricing.charge(request.message.price_per_gmac)
        if streamed:
            receipt = await self._stream_reply(stream, request, product, pieces.pop(), price)
        else:
            result = b"".join(pieces)
            del pieces
            reply = ok_reply(request, result, key=self._key, price_per_gmac=price,
                             compute_time_us=int(product.seconds * 1e6), now_ms=now_ms(),
                             payload_sha256=await trio.to_thread.run_sync(sha256, result))
            if self._cheater is not None:
                reply = self._cheater.reply(reply, self._key)
            await send_frame(stream, seal(reply, self._key), result, timeout_s=self._write_s(len(result)))
            assert reply.receipt is not None  # ok_reply always signs one
            receipt = reply.receipt
        if receipt is None:
            return None
        self._bump(served=1, macs=request.message.macs, earned=receipt.receipt.amount)
        return receipt, group_key(request.message.layers)

    def _write_s(self, size: int) -> float:
        """Time allowed to write `size` bytes of a reply: the client must read it at no less than
        the rate asked of its upload."""
        cfg = self.config
        return min(cfg.frame_timeout_s, cfg.header_timeout_s + size / cfg.min_upload_rate)

    async def _stream_reply(self, stream: INetStream, request: Verified[MatmulRequest], product: Product, first: bytes,
                            price: int) -> SignedReceipt | None:
        """Protocol 1.2: the reply's header and the result's first block, then each further block as
        it is computed (one block computed ahead of the one being written), then the trailer with
        the payload's digest and the receipt. The blocks still compute within the request's
        expiry; a failure once the header is out can only reset the stream (None: nothing served)."""
        digest = hashlib.sha256()
        remaining_s = (request.message.expires_at_ms - now_ms()) / 1000
        head = seal(streamed_reply(request, product.size), self._key)
        try:
            await send_bytes(stream, frame_head(head), timeout_s=self.config.header_timeout_s)
            await trio.to_thread.run_sync(digest.update, first)  # a layer-sized hash would stall the loop
            await send_bytes(stream, first, timeout_s=self._write_s(len(first)))
            del first  # sent: a block's bytes are held no longer than their write
            send, receive = trio.open_memory_channel[bytes](0)

            async def compute() -> None:
                async with send:
                    with trio.fail_after(remaining_s):
                        while not product.done:
                            await send.send(await self._compute(product))

            async with trio.open_nursery() as nursery:
                nursery.start_soon(compute)
                async with receive:
                    async for piece in receive:
                        await trio.to_thread.run_sync(digest.update, piece)
                        await send_bytes(stream, piece, timeout_s=self._write_s(len(piece)))
            trailer = reply_trailer(request, digest.digest(), key=self._key, price_per_gmac=price,
                                    compute_time_us=int(product.seconds * 1e6), now_ms=now_ms())
            if self._cheater is not None:
                trailer = self._cheater.reply(trailer, self._key)
            await send_frame(stream, seal(trailer, self._key), timeout_s=self.config.header_timeout_s)
        except Exception as exc:  # noqa: BLE001  # any failure: the client cannot be told otherwise
            leaves = leaf_errors(exc) if isinstance(exc, BaseExceptionGroup) else [exc]
            gone = all(isinstance(e, (trio.TooSlowError, *STREAM_ENDED)) for e in leaves)
            (log.debug if gone else log.error)("streamed reply to %s stopped: %r", ID(request.signer), leaves,
                                              exc_info=not gone)
            self._bump(errors=1)
            await close_stream(stream, reset=True)
            return None
        return trailer.receipt

    async def _await_ack(self, stream: INetStream, peer: ID, issued: SignedReceipt, layer: str, entry: int) -> None:
        """Wait (holding no place, in the bounded `acks` pool) for the countersigned receipt; a valid
        one gives the request's credit `entry` back."""
        ticket = self.acks.enter(peer, None)
        if ticket is None:  # the pool evicts instead; kept for a pool configured otherwise
            return
        try:
            with ticket.scope:
                frame = await read_frame(
                    stream,
                    limits=Limits(max_payload_size=0),
                    read_timeout_s=self.config.ack_timeout_s,
                    frame_timeout_s=self.config.ack_timeout_s,
                )
                ack = verify_receipt_ack(frame, peer=peer.to_bytes(), issued=issued)
        except ProtocolError as exc:  # no ack (the protocol makes it optional) or a bad one
            log.debug("no countersigned receipt from %s: %s", peer, exc)
            return
        finally:
            ticket.release()
        if ticket.scope.cancelled_caught:  # evicted: the oldest of too many waits
            log.debug("stopped waiting for %s's countersigned receipt: too many waits", peer)
            return
        self._bump(acks=1)
        self.credit.release(peer, entry)
        if self._ledger is not None:
            try:
                self._ledger.record(ack, layer=layer)
            except DuplicateReceipt:
                log.warning("%s acknowledged request %s twice", peer, issued.receipt.request_id.hex())

    # -- the product ---------------------------------------------------------------------------

    def _check_request(self, msg: MatmulRequest) -> None:
        """What the header alone says of the engine and of the work asked: the engine's name, no
        `mask_seeds` (the engine's payload carries its own: MalformedFrame), parameters that decode, a `payload_length` that is exactly the ciphertext the input shape
        needs under them (any other payload cannot parse: ShapeMismatch before it is read), and a
        product whose output and reply stay within the advertised limits (ReplyTooLarge before
        anything is allocated for it). Whether the parameters fit the ciphertext and the weights
        is checked with the payload (_prepare)."""
        if msg.backend != BACKEND:
            raise UnsupportedParams("not served here", backend=msg.backend)
        if msg.mask_seeds:  # README section 6: only for engines whose payload does not carry its seeds
            raise MalformedFrame(f"mask_seeds must be empty: a {BACKEND} payload carries its seeds")
        params = decode_params(msg.backend_params)
        (tokens, features), width = msg.input_shape, msg.output_shape[1]
        expected = ciphertext_size(params, tokens, features)
        if msg.payload_length != expected:
            raise ShapeMismatch("payload_length does not fit input_shape under backend_params",
                                expected=(expected,), got=(msg.payload_length,))
        cfg = self.config
        if (elements := output_elements(params, tokens, width)) > cfg.max_output_elements:
            raise ReplyTooLarge(cfg.max_output_elements, elements, what="output")
        if (size := result_size(params, tokens, width)) > cfg.max_reply_size:
            raise ReplyTooLarge(cfg.max_reply_size, size)

    async def _compute(self, product: Product) -> bytes:
        """The product's next block, computed in a worker thread holding a compute slot."""
        start = product.seconds
        piece = await trio.to_thread.run_sync(product.next_piece, limiter=self._limiter, abandon_on_cancel=True)
        self._compute_s = 0.8 * self._compute_s + 0.2 * (product.seconds - start)
        return piece

    def _prepare(self, msg: MatmulRequest, payload: bytes) -> Product:
        """Worker thread: parse the ciphertext, check it, the parameters and the weights agree, and
        set up its product."""
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
        if self._cheater is not None:
            weights = self._cheater.weights(weights)
        kind = (msg.layers, msg.weight_slice, msg.transpose, msg.input_shape)
        return Product(ct, weights, transpose=msg.transpose, method=self._method, gemm=self._gemm,
                       cheater=self._cheater, kind=kind)

    def _slice(self, layers: tuple[str, ...], part: WeightSlice) -> PlainWeights:
        """W[rows, cols] of the layers' column concatenation (checked against its shape by
        check_request_header): a held layer whole is the prepared one, anything else a copy of the slice."""
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
