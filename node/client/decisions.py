"""What the client decides about a layer call's chunks, free of I/O, clocks and randomness of its own.

The real client (dispatch.py and session.py, on trio) and the simulator (node/sim/policy.py, on its
discrete-event clock) both run these decisions, so an estimate replays what the client would do
instead of a copy that drifts from it. The caller does every send, wait and sleep; each method
returns what to do next or takes in what happened. The clock and the random generator are the
caller's (trio's clock and a fresh generator for the client, simulated time and a seeded generator
for the simulator).

A chunk (`ChunkDecisions`) goes through races until one is accepted:

- `next()` says whom to send it to (`Send`, the provider's slot taken), or to wait for the peer
  table to change (`Wait`: nobody is usable now; after `wait_providers_s` of that,
  NoProvidersError), or to back off first (`Backoff`: only providers that already failed this chunk
  are usable, so the one chosen is asked again only after an exponential backoff with jitter);
- a race is that attempt and, if it has not started replying within `hedge_after`, a `hedge` at the
  next best provider; the first accepted result wins (`accept`) and the other is a straggler;
- every failed attempt is penalised through the router (`failed`); a wrong result exposes the keys
  (the call must rotate them); once the race is over (`race_over`) its failures count against the
  chunk, except BUSY replies, which pace retries by the provider's hint and fail the chunk only
  after `wait_providers_s` of nothing else.

A call (`CallDecisions`) holds its plan, the chunks accepted so far and the key rotations: after a
wrong result every key rotates and the chunks not yet accepted are sent again under the new keys.
Each cheater is banned for good, so every rotation is caused by another identity and the call goes
on while honest holders are left; an identity may cause at most `max_rotations_per_peer` rotations
(only an identity whose ban was lifted during the call can cause a second one).

Every decision is reported to a journal (`Decision`), which is how the client and the simulator are
compared (tests/node/test_decisions.py).
"""

from __future__ import annotations

import enum
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass

from libp2p.peer.id import ID

from ..errors import ChunkFailedError, NoProvidersError, ProvidersCheatingError
from ..types import Chunk
from .config import ClientConfig
from .peers import Need, PeerState
from .router import AttemptFailed, ChunkRouter, FailureKind

log = logging.getLogger(__name__)


class Act(enum.Enum):
    SEND = "send"  # a race's first attempt (Decision.retry: after failures of this chunk)
    HEDGE = "hedge"  # a second attempt beside a straggling first
    BACKOFF = "backoff"  # wait before asking a provider that already failed this chunk again
    FAILED = "failed"  # an attempt failed (Decision.kind says how) and its provider was penalised
    ACCEPT = "accept"  # the chunk's first verified result
    STRAGGLER = "straggler"  # an attempt still running when its twin was accepted
    ROTATE = "rotate"  # a wrong result: every key rotates and the chunks not yet accepted go again


@dataclass(frozen=True, slots=True)
class Decision:
    """One decision about one chunk of a call (ROTATE: about the call; `chunk` is the cheated one)."""

    act: Act
    chunk: int
    peer: ID
    kind: FailureKind | None = None  # FAILED only
    retry: bool = False  # SEND only


Journal = Callable[[Decision], None]


def _ignore(decision: Decision) -> None:
    """The default journal: decisions are logged at DEBUG and kept nowhere else."""


@dataclass(frozen=True, slots=True)
class Send:
    """Start a race at `state`, whose slot is now taken (`ChunkDecisions.released` gives it back)."""

    state: PeerState
    retry: bool  # this chunk failed before: a retry


@dataclass(frozen=True, slots=True)
class Wait:
    """Nobody is usable: wait for the peer table to change, at most `seconds`, then ask `next()` again."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Backoff:
    """Sleep `seconds`, then ask `next()` again (it will not back off twice in a row)."""

    seconds: float


Step = Send | Wait | Backoff


class CallDecisions:
    """One layer call: its plan, the chunks accepted so far and the key rotations after cheats."""

    def __init__(
        self,
        router: ChunkRouter,
        plan: list[Chunk],
        *,
        layer: str,
        clock: Callable[[], float],
        rng: random.Random,
        starved: Callable[[], None] = lambda: None,
        journal: Journal = _ignore,
    ) -> None:
        self.router = router
        self.config: ClientConfig = router.config
        self.plan = plan
        self.layer = layer
        self.clock = clock
        self.rng = rng
        self.starved = starved  # nobody holds the layer at an affordable price: ask discovery again
        self._journal = journal
        self.done: set[int] = set()  # indices of the accepted chunks
        self.rotations: dict[ID, int] = {}  # rotations each identity caused in this call

    def pending(self) -> list[Chunk]:
        """The chunks not yet accepted: what the next round sends."""
        return [c for c in self.plan if c.index not in self.done]

    def chunk(self, chunk: Chunk, need: Need) -> ChunkDecisions:
        """The decisions of one round of `chunk` (a rotation starts each pending chunk afresh)."""
        return ChunkDecisions(self, chunk, need)

    def rotate(self, chunk: Chunk, peer: ID) -> None:
        """`peer` returned a wrong result for `chunk` (it is banned for good by now): the keys rotate
        and the pending chunks go again. ProvidersCheatingError if `peer` already caused
        `max_rotations_per_peer` rotations of this call."""
        caused = self.rotations.get(peer, 0)
        if caused >= self.config.max_rotations_per_peer:
            raise ProvidersCheatingError(self.layer, sum(self.rotations.values()))
        self.rotations[peer] = caused + 1
        self.record(Decision(Act.ROTATE, chunk.index, peer))

    def record(self, decision: Decision) -> None:
        log.debug("%s: %s", self.layer, decision)
        self._journal(decision)

    def retry_delay(self, failures: int) -> float:
        """Backoff before asking a provider that failed this chunk `failures` times again:
        doubling, capped, with jitter so that many clients do not retry in step."""
        c = self.config
        return min(c.retry_max_s, c.retry_base_s * 2 ** (failures - 1)) * self.rng.uniform(0.5, 1.0)


class ChunkDecisions:
    """One chunk until accepted: whom to ask, when to hedge, back off, give up (module docstring)."""

    def __init__(self, call: CallDecisions, chunk: Chunk, need: Need) -> None:
        self.call = call
        self.chunk = chunk
        self.need = need
        self.accepted = False
        self.avoid: dict[ID, int] = {}  # providers that failed this chunk, and how often
        self.failures: list[str] = []
        self._race: list[AttemptFailed] = []  # failures of the race under way
        self._busy_since: float | None = None  # every race since then was all BUSY replies
        self._waiting_since: float | None = None  # nobody was usable since then
        self._backed_off = False

    @property
    def _router(self) -> ChunkRouter:
        return self.call.router

    def next(self) -> Step:
        """What to do for the next race. Raises ChunkFailedError (out of attempts) or
        NoProvidersError (nobody usable, or all busy, for `wait_providers_s`). A provider's slot is
        taken as it is chosen, with nothing in between, so that concurrent chunks never all choose
        the same free slot."""
        config, table, now = self.call.config, self._router.table, self.call.clock()
        if len(self.failures) >= config.max_attempts:
            raise ChunkFailedError(self.call.layer, self.failures)
        if self._busy_since is not None and now - self._busy_since > config.wait_providers_s:
            raise NoProvidersError(self.call.layer, known=len(table), reason="all stayed busy")
        state = self._router.pick(self.need, avoid=self.avoid)
        if state is None:
            if self._waiting_since is None:
                self._waiting_since = now
            left = self._waiting_since + config.wait_providers_s - now
            holders = table.holders(self.need)  # affordable ones only
            if left <= 0:
                raise self._nobody(holders)
            if not holders:
                self.call.starved()
            return Wait(min(table.ready_in(self.need), left))
        self._waiting_since = None
        if state.peer in self.avoid and not self._backed_off:  # only providers that failed it are left
            self._backed_off = True
            self.call.record(Decision(Act.BACKOFF, self.chunk.index, state.peer))
            return Backoff(self.call.retry_delay(self.avoid[state.peer]))
        self._backed_off = False
        table.acquire(state.peer)
        retry = bool(self.failures)
        self.call.record(Decision(Act.SEND, self.chunk.index, state.peer, retry=retry))
        return Send(state, retry)

    def _nobody(self, holders: list[PeerState]) -> NoProvidersError:
        table = self._router.table
        if holders:
            reason = "all are busy or banned: " + ", ".join(table.describe(s) for s in holders)
        else:
            reason = "none holds this layer at an affordable price"
        if self.failures:
            reason += f", after: {'; '.join(self.failures[-3:])}"
        return NoProvidersError(self.call.layer, known=len(table), reason=reason)

    def hedge_after(self, first: PeerState) -> float:
        """Seconds after its upload starts that a race's first attempt is hedged, unless replying by then."""
        return self._router.hedge_delay(first, self.need.macs, self.need.payload)

    def timeout(self, state: PeerState) -> float:
        """Seconds an attempt at `state` may take from its upload's start to its reply's first bytes."""
        return self._router.attempt_timeout(state, self.need.macs, self.need.payload)

    def hedge(self, first: PeerState) -> PeerState | None:
        """The provider that races `first`, its slot taken; None if nobody else is usable."""
        hedge = self._router.pick(self.need, avoid={first.peer: 1})
        if hedge is None or hedge.peer == first.peer:
            return None
        self._router.table.acquire(hedge.peer)
        self.call.record(Decision(Act.HEDGE, self.chunk.index, hedge.peer))
        return hedge

    def released(self, peer: ID) -> None:
        """An attempt at `peer` is over, however it ended: its slot is free again."""
        self._router.table.release(peer)

    def failed(self, failure: AttemptFailed) -> bool:
        """Penalise the provider of a failed attempt (router.on_failure). True if it returned a
        wrong result: the keys are exposed and the call must rotate them (CallDecisions.rotate)."""
        self._router.on_failure(failure)
        self._race.append(failure)
        self.call.record(Decision(Act.FAILED, self.chunk.index, failure.peer, kind=failure.kind))
        return failure.kind is FailureKind.CHEATED

    def accept(self, peer: ID, *, elapsed_s: float, compute_s: float, macs: int, amount: int, payload: int,
               reply: int, reply_s: float) -> None:
        """`peer`'s verified result is the chunk's (the caller checked that no twin won first) and
        what it measured goes into the peer table (PeerTable.on_success)."""
        self.accepted = True
        self.call.done.add(self.chunk.index)
        self._router.table.on_success(peer, elapsed_s=elapsed_s, compute_s=compute_s, macs=macs, amount=amount,
                                      payload=payload, reply=reply, reply_s=reply_s)
        self.call.record(Decision(Act.ACCEPT, self.chunk.index, peer))

    def straggled(self, peer: ID, elapsed_s: float) -> None:
        """A twin was accepted while the attempt at `peer` had run `elapsed_s`: it is at least that slow."""
        self._router.table.on_straggler(peer, elapsed_s)
        self.call.record(Decision(Act.STRAGGLER, self.chunk.index, peer))

    def race_over(self) -> None:
        """Every attempt of the race has ended unaccepted: count its failures against the chunk
        (a race of BUSY replies alone starts, or continues, the busy wait instead)."""
        race, self._race = self._race, []
        if race and all(f.kind is FailureKind.BUSY for f in race):
            self._busy_since = self.call.clock() if self._busy_since is None else self._busy_since
            return
        self._busy_since = None
        for failure in race:
            self.avoid[failure.peer] = self.avoid.get(failure.peer, 0) + 1
            self.failures.append(str(failure))
