"""Chunk planning and provider choice for one layer call.

Plan: a call `x @ W` (tokens x contraction -> tokens x output) is cut along the three exact splits
of fhe-scheme.md, "Chunking":

- token blocks (`blocks`): each chunk a run of ring blocks; cuts input, output and work alike;
- output columns (`columns`): each chunk all tokens against a run of W's column blocks (the
  checker's grid, `fhe_backend.verify.column_grid`: the client can check whole blocks only); cuts
  output and work, and is the only split left when there are fewer blocks than providers (a call
  under N tokens);
- contraction rows (`rows`): each chunk a slice of the features; the client adds the partial
  products. Needed when one block's ciphertext exceeds a provider's payload limit.

"auto" takes `rows` if one block does not fit the smallest payload limit among the holders,
`blocks` if there are at least as many blocks as usable providers, `columns` otherwise; then
adds block groups until every chunk's payload fits. The chunk count follows the number of usable
providers (at most `max_chunks`), so every provider gets work and a slow one holds up one chunk.

Choice: the chunks are assigned when they are sent, not in the plan: each goes to the provider
usable at that moment with the fewest of our requests in flight, the best score among those (score:
expected time over reputation, plus price). That spreads a call over all providers, gives faster
ones more when there are more chunks than providers, respects each provider's slots, and lets
retries and hedges go elsewhere. A provider that already failed this chunk is chosen again only when no other is usable,
after an exponential backoff (`retry_delay`).
"""

from __future__ import annotations

import enum
import itertools
import random
from collections.abc import Callable
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from cipherswarm.fhe_backend.verify import column_grid
from cipherswarm.protocol import Range

from ..errors import NoProvidersError
from ..types import Chunk
from .config import ClientConfig
from .peers import Need, PeerState, PeerTable


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
    in_bytes: int  # bytes per input word on the wire

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
        return self.contraction * self.n * self.in_bytes


class ChunkRouter:
    """Plans chunks and chooses providers; `on_failure` turns an attempt's failure into a penalty."""

    def __init__(self, table: PeerTable, config: ClientConfig, *, starved: Callable[[], None] = lambda: None) -> None:
        self.table = table
        self.config = config
        self._starved = starved  # called when nobody holds a layer: ask discovery for a fresh lookup

    def plan(self, shape: CallShape, *, providers: int, max_payload: int) -> list[Chunk]:
        """The chunks of a call for `providers` usable providers whose smallest payload limit is
        `max_payload`."""
        k = max(1, min(providers, self.config.max_chunks))
        grid = shape.column_grid
        kind = self.config.split
        if kind == "auto":
            if shape.block_bytes > max_payload:
                kind = "rows"
            elif shape.blocks >= k:
                kind = "blocks"
            else:
                kind = "columns"
        groups = rows = cols = 1
        if kind == "blocks":
            groups = max(k, _pieces_to_fit(shape.blocks, shape.block_bytes, max_payload))
        elif kind == "columns":
            cols = min(k, len(grid) - 1)
            groups = _pieces_to_fit(shape.blocks, shape.block_bytes, max_payload)
        else:
            feature_bytes = shape.n * shape.in_bytes  # one feature of one block
            rows = min(shape.contraction, max(k, _pieces_to_fit(shape.contraction, feature_bytes, max_payload)))
            part_bytes = _ceil_div(shape.contraction, rows) * feature_bytes  # the largest row part of one block
            groups = _pieces_to_fit(shape.blocks, part_bytes, max_payload)
        groups = min(shape.blocks, groups)
        outputs = [Range(grid[a.start], grid[a.stop]) for a in _ranges(len(grid) - 1, cols)]
        product = itertools.product(_ranges(shape.blocks, groups), _ranges(shape.contraction, rows), outputs)
        return [Chunk(i, b, c, o, row_parts=rows) for i, (b, c, o) in enumerate(product)]

    def score(self, state: PeerState, macs: int, payload: int = 0) -> float:
        """Lower is better: expected seconds discounted by reputation, plus what the price is worth."""
        cost = state.advert.price_per_gmac * macs / 1e9
        return state.expected_s(macs, payload) / state.reputation + self.config.price_weight_s * cost

    def _affordable(self, states: list[PeerState]) -> list[PeerState]:
        return [s for s in states if s.advert.price_per_gmac <= self.config.max_price_per_gmac]

    def pick(self, need: Need, *, avoid: dict[ID, int]) -> PeerState | None:
        """The provider usable now with the fewest failures of this chunk (`avoid`: peer ->
        failures), then the fewest of our requests in flight (spread a call over providers before
        stacking it on one), then the best score; None if none is usable."""
        ranked = self._affordable(self.table.available(need))
        if not ranked:
            return None
        return min(ranked, key=lambda s: (avoid.get(s.peer, 0), s.in_flight, self.score(s, need.macs, need.payload)))

    async def choose(self, need: Need, *, avoid: dict[ID, int], layer: str) -> PeerState:
        """`pick`, waiting up to `wait_providers_s` for a provider to become usable (a freed
        slot, a BUSY hint or a ban running out, a new advert). NoProvidersError after that."""
        deadline = trio.current_time() + self.config.wait_providers_s
        while (state := self.pick(need, avoid=avoid)) is None:
            holders = self._affordable(self.table.holders(need))
            now = trio.current_time()
            if now >= deadline:
                if holders:
                    reason = "all are busy or banned: " + ", ".join(self.table.describe(s) for s in holders)
                else:
                    reason = "none holds this layer at an affordable price"
                raise NoProvidersError(layer, known=len(self.table), reason=reason)
            if not holders:
                self._starved()
            await self.table.wait_change(min(self.table.ready_in(need), deadline - now))
        return state

    def hedge_delay(self, state: PeerState, macs: int, payload: int = 0) -> float:
        return max(self.config.hedge_min_s, self.config.hedge_factor * state.expected_s(macs, payload))

    def attempt_timeout(self, state: PeerState, macs: int, payload: int = 0) -> float:
        limit = max(self.config.timeout_min_s, self.config.timeout_factor * state.expected_s(macs, payload))
        return min(self.config.request_ttl_s, limit)

    def retry_delay(self, attempt: int) -> float:
        """Backoff before the `attempt`-th retry at a provider that already failed: doubling, capped,
        with jitter so that many clients do not retry in step."""
        return min(self.config.retry_max_s, self.config.retry_base_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)

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
