"""Chunk planning and provider choice for one layer call.

Plan: a call `x @ W` (tokens x contraction -> tokens x output) is cut along the three exact splits
of fhe-scheme.md, "Chunking":

- token blocks (`blocks`): each chunk a run of ring blocks; cuts input, output and work alike, and
  moves no byte twice;
- output columns (`columns`): each chunk all tokens against a run of W's column blocks (the
  checker's grid, `fhe_backend.verify.column_grid`: the client can check whole blocks only); cuts
  output and work, but sends the same input to every provider;
- contraction rows (`rows`): each chunk a slice of the features; the client adds the partial
  products, so every provider returns a full-size output. Needed when one block's ciphertext
  exceeds a provider's payload limit.

Every chunk stays within what the providers it may be sent to advertise (`ChunkLimits`, the
strictest of their adverts): its payload, its reply's bytes and output elements (more block groups,
and column cuts where one block's output is too big), and a contraction of at least their
`min_contraction` features (fewer row parts), so that no honest chunk is refused for its size.

The client's link, not the providers, usually bounds a fine-tune, so "auto" chooses by the bytes a
plan moves: `rows` only if one block does not fit the smallest payload limit among the holders
(as few parts as fit), otherwise token `blocks`, or blocks with the columns cut in 2, 4, ... or one
part per provider, whichever `plan_cost` expects to finish first: the input copies cost time on
the client's measured link, and what they buy is less compute and a smaller reply per provider
(on home links, a provider's uplink returns a big output slowly). Then block groups are added
until every chunk's payload fits. The chunk count follows the number of usable providers (at most
`max_chunks`), so every provider gets work and a slow one holds up one chunk.

Choice: the chunks are assigned when they are sent, not in the plan: each goes to the provider
usable at that moment with the fewest of our requests in flight, the best score among those (score:
expected time over reputation, weighed by price). That spreads a call over all providers, gives faster
ones more when there are more chunks than providers, respects each provider's slots, and lets
retries and hedges go elsewhere. A provider that already failed this chunk is chosen again only when no other is usable,
after an exponential backoff (decisions.py, which waits, backs off and hedges around `pick`).

Preference (`ClientConfig.prefer`, the pair (m, a) of `PREFERENCES`): among the usable providers, a
call is planned for and its chunks spread over the *pool* of those asking at most m times the
cheapest one's price, each ranked by its score:

    pool  = { p usable : price_p + 1 <= m * (min over usable of price + 1), or p never served us }
    score = T_p / R_p * (price_p + 1) ** a  +  price_weight_s * cost_p

with T_p the chunk's expected seconds (PeerState.expected_s: latency, payload over the link, compute
with our requests queued there), R_p the reputation, cost_p = price_p x MACs / 10^9 and prices per
GMAC (+1, so that a free provider does not make every other one infinitely dear):

- `speed` (m = inf, a = 0): price plays no part; every usable provider shares the work by time;
- `balanced` (m = 2, a = 1): providers at most twice the cheapest's price share a call, and where
  there is a choice, time x price decides (twice the price must buy half the time);
- `price` (m = 1, a = 1): only the cheapest price gets chunks while it has a free slot; when it is
  full, busy or banned the pool is the next cheapest usable one, so the run is never starved.

Whatever the preference, a provider that never served us is in the pool until it has: each is
measured by one chunk instead of being judged by its advert, and a cheater among the dearer ones is
met and banned (pick).

The pool is recomputed at every choice from the providers usable then, so the simulator, which
calls the same router, makes the same choices (sim/policy.py).
"""

from __future__ import annotations

import enum
import itertools
import logging
import math
import statistics
from dataclasses import dataclass
from functools import partial

from libp2p.peer.id import ID

from cipherswarm.fhe_backend.ciphertext import RESULT_HEAD_BYTES
from cipherswarm.fhe_backend.params import wire_bytes
from cipherswarm.fhe_backend.sampling import SEED_BYTES
from cipherswarm.fhe_backend.verify import column_grid
from cipherswarm.protocol import Range

from ..types import Chunk, ProviderAdvert
from .config import ClientConfig
from .peers import Need, PeerState, PeerTable

log = logging.getLogger(__name__)

#: Providers whose score is within this factor of the best count as equals when choosing (`pick`).
NEAR_BEST = 1.25
#: A plan that moves more bytes is taken only if the cost model expects it to take at most this
#: share of the time of the plan it would replace: its inputs (a link measured by some requests,
#: a provider's rate that includes its per-request overhead) are estimates, and bytes are certain.
SPREAD_GAIN = 0.75
#: ClientConfig.prefer -> (m, a): the pool takes providers asking at most m times the cheapest price,
#: and the score weighs expected time by price to the power a (module docstring, "Preference")
PREFERENCES: dict[str, tuple[float, float]] = {"speed": (math.inf, 0.0), "balanced": (2.0, 1.0), "price": (1.0, 1.0)}

class FailureKind(enum.Enum):
    TIMEOUT = "timeout"  # no reply within the attempt's deadline
    UNREACHABLE = "unreachable"  # dial failed, or the connection or stream broke
    BUSY = "busy"  # the provider's BUSY reply
    REFUSED = "refused"  # any other error reply (unknown layer, parameters, payment, ...)
    CHEATED = "cheated"  # an invalid reply or a wrong result


class AttemptFailed(Exception):
    """One attempt of a chunk at one provider failed."""

    def __init__(self, peer: ID, kind: FailureKind, reason: str, *, retry_after_s: float = 0.0) -> None:
        super().__init__(f"{peer}: {kind.value}: {reason}")
        self.peer = peer
        self.kind = kind
        self.reason = reason
        self.retry_after_s = retry_after_s


def _ranges(total: int, parts: int) -> list[Range]:
    """`parts` nearly equal consecutive ranges covering [0, total)."""
    bounds = [total * i // parts for i in range(parts + 1)]
    return [Range(a, b) for a, b in itertools.pairwise(bounds)]


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _pieces_to_fit(items: int, item_bytes: int, max_payload: int) -> int:
    """Pieces of consecutive items (blocks, or features) needed so that no piece's payload exceeds
    `max_payload` (one item per piece when even one is too big)."""
    return _ceil_div(items, max(1, max_payload // item_bytes))


@dataclass(frozen=True, slots=True)
class CallShape:
    """The geometry of one layer call, in the operand's axes."""

    tokens: int
    n: int  # tokens per ring block
    contraction: int
    output: int
    in_bytes: float  # bytes per input word on the wire (a fraction when bit-packed: Params.in_bytes)
    out_bytes: int  # bytes per output value on the wire
    pad_bytes: int = 0  # bytes per output value of a padding token (Params.pad_bytes)

    @property
    def blocks(self) -> int:
        return _ceil_div(self.tokens, self.n)

    @property
    def column_grid(self) -> list[int]:
        """Where output columns may be cut: the bounds of the checker's column blocks."""
        return column_grid(self.contraction, self.output)

    @property
    def block_bytes(self) -> int:
        """Input payload of one block with every feature (seeds and headers aside)."""
        return math.ceil(self.contraction * self.n * self.in_bytes)


@dataclass(frozen=True, slots=True)
class ChunkLimits:
    """What every chunk of a plan must respect: the strictest advert among the providers it may be
    sent to, since any chunk may go to any of them (None: no provider states that limit)."""

    max_payload: int  # request payload bytes
    max_reply: int | None = None  # reply payload bytes
    max_output: int | None = None  # result elements the provider computes: ring blocks x n x width
    min_contraction: int = 1  # contraction features per chunk, unless the layer has fewer

    @classmethod
    def of(cls, adverts: list[ProviderAdvert], *, max_payload: int) -> ChunkLimits:
        """The strictest limits of `adverts`, the payload also within `max_payload`."""
        def smallest(values: list[int]) -> int | None:
            return min((v for v in values if v), default=None)  # 0: not stated
        return cls(max_payload=min(max_payload, *(a.max_payload_size for a in adverts)),
                   max_reply=smallest([a.max_reply_size for a in adverts]),
                   max_output=smallest([a.max_output_elements for a in adverts]),
                   min_contraction=max([1, *(a.min_contraction for a in adverts)]))

    def contraction_floor(self, shape: CallShape) -> int:
        """The fewest features a chunk may contract over: a whole contraction is always allowed."""
        return min(self.min_contraction, shape.contraction)

    @staticmethod
    def reply_bound(shape: CallShape, blocks: int, width: int, row_parts: int) -> int:
        """At least the reply payload of a chunk of `blocks` ring blocks by `width` output columns:
        the result's header, a seed per block (shared-mask profile) and a whole value for every
        slot. A row part's output words are wider (Params.with_row_parts), at most two input words."""
        per_value = shape.out_bytes if row_parts == 1 else max(shape.out_bytes, 2 * shape.in_bytes)
        return RESULT_HEAD_BYTES + blocks * (SEED_BYTES + math.ceil(shape.n * width * per_value))

    def most_blocks(self, shape: CallShape, width: int, row_parts: int) -> int:
        """The most ring blocks one chunk of `width` output columns may hold within the reply and
        output limits (0: not even one)."""
        most = shape.blocks
        if self.max_output is not None:
            most = min(most, self.max_output // (shape.n * width))
        if self.max_reply is not None:
            one = self.reply_bound(shape, 1, width, row_parts) - RESULT_HEAD_BYTES
            most = min(most, max(0, self.max_reply - RESULT_HEAD_BYTES) // one)
        return most

    def columns_to_fit(self, shape: CallShape, row_parts: int) -> int:
        """The fewest column parts (on the checker's grid) whose widest part fits one block's reply
        and output (every part, if even a single grid block does not fit: the best there is)."""
        grid = shape.column_grid
        cells = len(grid) - 1
        for parts in range(1, cells):
            widest = max(grid[r.stop] - grid[r.start] for r in _ranges(cells, parts))
            if self.most_blocks(shape, widest, row_parts) >= 1:
                return parts
        return cells


@dataclass(frozen=True, slots=True)
class PlanCost:
    """What a plan moves through the client's link and how long the router expects it to take."""

    bytes_up: int  # ciphertext payloads, every chunk's own (replicated inputs counted each time)
    bytes_down: int  # result payloads (row parts return full-size outputs each)
    seconds: float  # both directions over the client's link, plus the compute waves

    def describe(self) -> str:
        return f"{self.bytes_up / 1e6:.2f} MB up, {self.bytes_down / 1e6:.2f} MB down, ~{self.seconds:.3f} s"


def plan_cost(shape: CallShape, chunks: list[Chunk], *, providers: int, link_bps: float, rate: float,
              reply_bps: float = math.inf) -> PlanCost:
    """The bytes `chunks` move and a time model for comparing plans: every byte through one link of
    `link_bps` (the client's; its uplink is what a replicated input costs, and a row split's extra
    outputs cost its downlink), plus ceil(chunks / providers) waves of the largest chunk, computed
    at `rate` MAC/s and its reply sent at `reply_bps` (a provider's uplink: a home provider returns
    a big output slowly, and cutting the output columns among more providers is what shortens
    that). Not a prediction of the wall time (node/sim predicts that): just enough to tell whether
    spreading one call over more providers is worth the bytes."""
    up = down = 0
    largest = largest_reply = 0
    for c in chunks:
        slots = len(c.blocks) * shape.n
        tokens = len(c.tokens(shape.n, shape.tokens))
        up += math.ceil(wire_bytes(tokens, shape.n, len(c.contraction), shape.in_bytes))
        reply = wire_bytes(tokens, shape.n, len(c.output), shape.out_bytes, shape.pad_bytes)
        down += reply
        largest = max(largest, slots * len(c.contraction) * len(c.output))
        largest_reply = max(largest_reply, reply)
    waves = _ceil_div(len(chunks), max(1, providers))
    return PlanCost(up, down, (up + down) / link_bps + waves * (largest / rate + largest_reply / reply_bps))


class ChunkRouter:
    """Plans chunks and chooses providers; `on_failure` turns an attempt's failure into a penalty."""

    def __init__(self, table: PeerTable, config: ClientConfig) -> None:
        self.table = table
        self.config = config

    def plan(self, shape: CallShape, *, providers: int, max_payload: int, link_bps: float = math.inf,
             rate: float = 1.0, reply_bps: float = math.inf, max_reply: int | None = None,
             max_output: int | None = None, min_contraction: int = 1) -> list[Chunk]:
        """The chunks of a call for `providers` usable providers whose smallest payload limit is
        `max_payload` (and reply, output and contraction limits, ChunkLimits), over a client link
        of `link_bps` bytes/s to providers computing `rate` MAC/s and replying at `reply_bps` (with
        the default, an infinitely fast client link, replicating costs nothing and "auto" spreads a
        call as widely as it can)."""
        limits = ChunkLimits(max_payload, max_reply, max_output, min_contraction)
        k = max(1, min(providers, self.config.max_chunks))
        kind = self.config.split
        if kind != "auto":
            return self._layout(shape, kind, k, limits)
        if shape.block_bytes > max_payload:  # as few row parts as fit: each returns a full-size output
            return self._layout(shape, "rows", k, limits, spread_rows=False)
        # token blocks, then cuts of the columns into powers of two and into one per provider (the
        # input sent that many times)
        widest = min(k, len(shape.column_grid) - 1)
        cuts = sorted({2**i for i in range(1, widest.bit_length())} | {widest} - {1})
        plans = [self._layout(shape, "blocks", k, limits)]
        plans += [self._layout(shape, "columns", k, limits, cols=c) for c in cuts]
        cost = partial(plan_cost, shape, providers=k, link_bps=link_bps, rate=rate, reply_bps=reply_bps)
        best, best_s = plans[0], cost(plans[0]).seconds
        for plan in plans[1:]:  # more bytes each: worth them only for a clear gain (the inputs are estimates)
            if (seconds := cost(plan).seconds) < SPREAD_GAIN * best_s:
                best, best_s = plan, seconds
        return best

    def plan_for(self, shape: CallShape, holders: list[PeerState], *, layer: str) -> list[Chunk]:
        """`plan` for the holders of a layer: the usable ones now (all of them if none is), the
        client's link as the fastest one measured to any of them (each measurement is a lower
        bound: uploads share the link), their mean rate and the mean reply rate of those measured.
        A chunk stays within the strictest of their adverts (ChunkLimits) and its payload within what
        that link uploads in half a request's lifetime, so that every request reaches its provider
        before it expires. The plan is logged with the bytes it moves."""
        usable = self.pool([s for s in holders if self.table.usable(s)] or holders)
        link = max(s.link_bps for s in usable)
        rate = statistics.fmean(s.rate for s in usable)
        measured = [s.reply_bps for s in usable if math.isfinite(s.reply_bps)]
        reply_bps = statistics.fmean(measured) if measured else math.inf  # unknown: not spread on a guess
        limits = ChunkLimits.of([s.advert for s in usable], max_payload=int(link * self.config.request_ttl_s / 2))
        chunks = self.plan(shape, providers=len(usable), link_bps=link, rate=rate, reply_bps=reply_bps,
                           max_payload=limits.max_payload, max_reply=limits.max_reply, max_output=limits.max_output,
                           min_contraction=limits.min_contraction)
        if log.isEnabledFor(logging.DEBUG):
            cost = plan_cost(shape, chunks, providers=len(usable), link_bps=link, rate=rate, reply_bps=reply_bps)
            log.debug("plan for %s (%d tokens, %d x %d): %d chunk(s) over %d token group(s), %d row part(s), "
                      "%d column part(s); %s", layer, shape.tokens, shape.contraction, shape.output, len(chunks),
                      len({c.blocks for c in chunks}), chunks[0].row_parts, len({c.output for c in chunks}),
                      cost.describe())
        return chunks

    def _layout(self, shape: CallShape, kind: str, k: int, limits: ChunkLimits, *, spread_rows: bool = True,
                cols: int = 0) -> list[Chunk]:
        """The chunks of one kind of split for `k` providers, block groups added until each fits.
        Rows: `k` row parts when `spread_rows` (the split asked for by name), else only as many as
        fit the payload limit, with the blocks spread instead (they cost no extra bytes); never
        thinner than the contraction floor. Columns: `cols` column parts (0: `k`), with the blocks
        spread over the providers left. Any kind cuts the columns too where one block's reply or
        output would exceed the limits."""
        grid = shape.column_grid
        max_payload = limits.max_payload
        groups = rows = 1
        if kind == "rows":
            feature_bytes = math.ceil(shape.n * shape.in_bytes)  # one feature of one block
            rows = max(k if spread_rows else 1, _pieces_to_fit(shape.contraction, feature_bytes, max_payload))
            rows = min(rows, shape.contraction // limits.contraction_floor(shape))
            part_bytes = _ceil_div(shape.contraction, rows) * feature_bytes  # the largest row part of one block
            groups = _pieces_to_fit(shape.blocks, part_bytes, max_payload)
        fit = limits.columns_to_fit(shape, rows)
        if kind == "rows":
            cols = fit
            if not spread_rows:
                groups = max(k // (rows * cols), groups)
        else:
            cols = min(max(fit, 1 if kind == "blocks" else cols or k), len(grid) - 1)
            groups = max(k // cols, _pieces_to_fit(shape.blocks, shape.block_bytes, max_payload))
        widest = max(grid[r.stop] - grid[r.start] for r in _ranges(len(grid) - 1, cols))
        groups = max(groups, _ceil_div(shape.blocks, max(1, limits.most_blocks(shape, widest, rows))))
        groups = min(shape.blocks, groups)
        outputs = [Range(grid[a.start], grid[a.stop]) for a in _ranges(len(grid) - 1, cols)]
        product = itertools.product(_ranges(shape.blocks, groups), _ranges(shape.contraction, rows), outputs)
        return [Chunk(i, b, c, o, row_parts=rows) for i, (b, c, o) in enumerate(product)]

    def pool(self, states: list[PeerState]) -> list[PeerState]:
        """The providers of `states` that the preference lets share the work: those asking at most m
        times the cheapest price among them, and any that never served us, whatever its price (its
        one chunk measures it, as `pick` does for every provider, and meets a cheater among them)
        (module docstring, "Preference")."""
        m, _ = PREFERENCES[self.config.prefer]
        if not states or math.isinf(m):
            return states
        cheapest = min(s.advert.price_per_gmac for s in states)
        return [s for s in states if s.advert.price_per_gmac + 1 <= m * (cheapest + 1) or s.chunks == 0]

    def score(self, state: PeerState, macs: int, payload: int = 0) -> float:
        """Lower is better: expected seconds discounted by reputation, weighed by price as the
        preference says, plus what the price is worth at `price_weight_s`."""
        _, a = PREFERENCES[self.config.prefer]
        price = state.advert.price_per_gmac
        weighed = state.expected_s(macs, payload) / state.reputation * (price + 1) ** a
        return weighed + self.config.price_weight_s * price * macs / 1e9

    def pick(self, need: Need, *, avoid: dict[ID, int]) -> PeerState | None:
        """The provider usable now with the fewest failures of this chunk (`avoid`: peer ->
        failures), then in the preference's pool of those (`pool`: no dearer than it allows of the
        cheapest), the fewest of our requests in flight (spread a call over providers before
        stacking it on one), then, among those scoring within `NEAR_BEST` of the best or not yet
        measured (never served us), the one that served us the fewest chunks: every provider is
        measured once instead of being judged by a seed (so a cheater among them is met and caught
        even when each call is one chunk), and near-equals share the work. The seed cannot be raised
        by an advert (PeerTable.seed_rate), and the first measurement replaces it: a newcomer
        claiming a fast device gets that one chunk, then what its measured rate earns. Providers
        dearer than the user's maximum are not holders (PeerTable.holders). None if none is usable."""
        ranked = self.table.available(need)
        if not ranked:
            return None
        fewest = min(avoid.get(s.peer, 0) for s in ranked)
        ranked = self.pool([s for s in ranked if avoid.get(s.peer, 0) == fewest])
        first = min(s.in_flight for s in ranked)
        ranked = [s for s in ranked if s.in_flight == first]
        scores = {s.peer: self.score(s, need.macs, need.payload) for s in ranked}
        best = min(scores.values())
        near = [s for s in ranked if scores[s.peer] <= NEAR_BEST * best or s.chunks == 0]
        return min(near, key=lambda s: (s.chunks, scores[s.peer]))

    def hedge_delay(self, state: PeerState, macs: int, payload: int = 0) -> float:
        return max(self.config.hedge_min_s, self.config.hedge_factor * state.expected_s(macs, payload))

    def attempt_timeout(self, state: PeerState, macs: int, payload: int = 0) -> float:
        limit = max(self.config.timeout_min_s, self.config.timeout_factor * state.expected_s(macs, payload))
        return min(self.config.request_ttl_s, limit)

    def on_failure(self, failure: AttemptFailed) -> None:
        """Penalise the provider of a failed attempt (peers.py says what each penalty is)."""
        match failure.kind:
            case FailureKind.TIMEOUT | FailureKind.UNREACHABLE:
                self.table.on_timeout(failure.peer)
            case FailureKind.BUSY:
                self.table.on_busy(failure.peer, failure.retry_after_s)
            case FailureKind.REFUSED:
                self.table.on_failure(failure.peer)
            case FailureKind.CHEATED:
                self.table.on_cheat(failure.peer, failure.reason)
