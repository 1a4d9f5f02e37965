"""The client's table of providers: what each offers, how it has performed, and who is banned.

Scores come from measurement, not from what a provider claims: each successful chunk updates a
moving average of the provider's latency (reply time minus its reported compute time), of its
rate (MACs over compute time; the first measurement replaces the seed outright) and of the link
to it (request payload bytes over that same non-compute time); the client's assumed link rate
seeds the link. Until a provider's rate is measured it is seeded with its advertised MAC/s capped
by the median measured rate of the providers known (`unmeasured_rate`, a modest CPU's, while none
is measured), and re-seeded as that median moves: an advert can lower its own seed but never raise
it above what the swarm has shown, so a fresh identity claiming a fast device is not preferred
over measured providers (router.pick still gives every never-served provider one chunk, after
which its measurement decides). The link term keeps deadlines sane on slow uplinks: a chunk's
expected time is at least its payload's transfer time, not just the provider's compute.
Reputation is the smoothed success ratio (successes + 1) / (successes + failures + 2). These
records are kept in the ledger, so a provider starts the next session with the record it earned
(its rate only if it served: an unmeasured record holds nothing but a seed).

Price: a provider whose advert asks more per GMAC than the user's maximum (`max_price_per_gmac`,
from ClientConfig) is not a holder: nothing is planned for it or sent to it.

Bans:
- a provider that times out or cannot be reached is banned for `ban_base_s`, doubled with each
  further such failure in a row (up to `ban_max_s`) and reset by a success;
- a provider that returned a wrong result is banned for good; the ban is written to the ledger and
  read back at start, so it survives restarts. `forgive` lifts both kinds.

The clock is injected (trio's by default, so tests can use `autojump_clock`), and so is the wall
clock that adverts' expiry times are compared with.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import trio
from libp2p.peer.id import ID

from ..discovery import now_ms
from ..ledger import Ledger, TrackRecord
from ..nat import is_circuit
from ..types import PeerView, ProviderAdvert
from .config import ClientConfig

EWMA = 0.3  # weight of a new measurement in the moving averages
INITIAL_LATENCY_S = 0.05
LINK_SAMPLE_MIN_BYTES = 1 << 20  # smaller payloads measure latency, not the link
#: MAC/s assumed of an unmeasured provider while no provider is measured (an advert below it is
#: taken as is): a modest CPU's encrypted rate (one 2-core machine measured 5.7e9, a GPU ~5e12,
#: bench/RESULTS.md). Low on purpose: a low seed only delays hedges and plans a first call wider.
UNMEASURED_RATE = 1e9


@dataclass(frozen=True, slots=True)
class Need:
    """What a chunk needs of a provider."""

    model_hash: bytes
    layer_digests: tuple[bytes, ...]  # the layer's, or every member's of a group
    payload: int  # request payload bytes
    macs: int  # work, as the provider computes it (padded to whole blocks)


@dataclass(eq=False)
class PeerState:
    """One provider as the client sees it. Mutable: the table updates it in place."""

    advert: ProviderAdvert
    capacity: int  # requests we send it at once: the most free slots it ever advertised, within its credit
    rate: float  # MAC/s of its computation, measured once `measured`, else a seed (PeerTable.seed_rate)
    link_bps: float  # bytes/s a request's payload reaches it at, measured (seeded by the client's assumption)
    # bytes/s its replies reach us at: its uplink, mostly. Unknown (inf) until measured: no call
    # is spread wider on an assumption (router.plan_cost)
    reply_bps: float = math.inf
    latency_s: float = INITIAL_LATENCY_S
    successes: int = 0
    failures: int = 0
    timeouts_in_row: int = 0
    chunks: int = 0
    macs: int = 0
    paid: int = 0
    in_flight: int = 0
    busy_until: float = 0.0
    banned_until: float = 0.0
    measured: bool = False  # `rate` comes from served chunks (this session's or the ledger's), not a seed

    @property
    def peer(self) -> ID:
        return self.advert.peer

    @property
    def reputation(self) -> float:
        return (self.successes + 1) / (self.successes + self.failures + 2)

    def expected_s(self, macs: int, payload: int = 0) -> float:
        """Expected time for a chunk of `macs` whose request carries `payload` bytes, queueing behind
        our own requests included: the round trip (at least the payload's transfer) plus compute."""
        compute = macs / max(self.rate, 1.0)
        return max(self.latency_s, payload / self.link_bps) + compute * (1 + self.in_flight / self.capacity)


class PeerTable:
    """Providers by peer id; the single place that decides who may be used now."""

    def __init__(
        self,
        *,
        ledger: Ledger,
        ban_base_s: float = 10.0,
        ban_max_s: float = 600.0,
        link_bps: float = 2.5e6,
        max_price_per_gmac: int | None = None,
        request_ttl_s: float | None = None,
        unmeasured_rate: float = UNMEASURED_RATE,
        clock: Callable[[], float] = trio.current_time,
        wall_ms: Callable[[], int] = now_ms,
    ) -> None:
        self._ledger = ledger
        self._peers: dict[ID, PeerState] = {}
        self._banned_forever = ledger.bans()  # base58 peer id -> reason
        self._records = ledger.records()  # base58 peer id -> TrackRecord of earlier sessions
        self.ban_base_s = ban_base_s
        self.ban_max_s = ban_max_s
        self.link_bps = link_bps
        # the most the user pays per 10^9 MACs (None: any price); dearer providers are not holders.
        # The session passes ClientConfig.max_price_per_gmac.
        self.max_price_per_gmac = max_price_per_gmac
        # the lifetime of the client's requests (None: not checked); a provider advertising a shorter
        # max_ttl would refuse every one of them (EXPIRED), so it is not a holder
        self.request_ttl_ms = None if request_ttl_s is None else int(1000 * request_ttl_s)
        self.unmeasured_rate = unmeasured_rate
        self._clock = clock
        self._wall_ms = wall_ms
        self._changed = trio.Event()

    @classmethod
    def for_client(cls, config: ClientConfig, ledger: Ledger, **clocks: Callable[[], float] | Callable[[], int]) -> PeerTable:
        """The table a client with `config` keeps (the session's, and the simulator's on its clocks:
        `clock` and `wall_ms`)."""
        return cls(ledger=ledger, ban_base_s=config.ban_base_s, ban_max_s=config.ban_max_s, link_bps=config.link_bps,
                   max_price_per_gmac=config.max_price_per_gmac, request_ttl_s=config.request_ttl_s, **clocks)  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self._peers)

    def get(self, peer: ID) -> PeerState:
        return self._peers[peer]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_change(self, timeout_s: float) -> None:
        """Return when an advert arrives, a slot frees up or a ban changes, or after `timeout_s`."""
        with trio.move_on_after(max(timeout_s, 0.0)):
            await self._changed.wait()

    # -- adverts -------------------------------------------------------------------------------

    def update(self, advert: ProviderAdvert) -> None:
        """Take in an advert; an older one than the provider's last is ignored, as are adverts of
        providers banned for good that are not known yet. A known one's advert is kept fresh while
        it is banned (`holders` leaves it out), so that `forgive` makes it usable at once, not only
        once its next advert comes."""
        state = self._peers.get(advert.peer)
        if state is None and advert.peer.to_base58() in self._banned_forever:
            return
        if state is None:
            state = self._peers[advert.peer] = PeerState(
                advert=advert, capacity=_capacity(advert, advert.free_slots), rate=self.seed_rate(advert), link_bps=self.link_bps,
            )
            record = self._records.get(advert.peer.to_base58())
            if record is not None:
                state.successes, state.failures, state.latency_s = record.successes, record.failures, record.latency_s
                if record.successes > 0 and record.rate > 0:  # measured by an earlier session (else only a seed)
                    state.rate, state.measured = record.rate, True
        elif advert.issued_at_ms > state.advert.issued_at_ms:
            state.advert = advert
            state.capacity = _capacity(advert, max(state.capacity, advert.free_slots))
            if not state.measured:
                state.rate = self.seed_rate(advert)
        else:
            return
        self._notify()

    def seed_rate(self, advert: ProviderAdvert) -> float:
        """The rate assumed of a provider not yet measured: its advertised MAC/s, but at most the
        median measured rate of the providers known (`unmeasured_rate` while none is measured).
        An advert alone can never make a provider look faster than the swarm has been measured."""
        return self._seed(advert, self._reference_rate())

    def _reference_rate(self) -> float:
        measured = [s.rate for s in self._peers.values() if s.measured and s.peer.to_base58() not in self._banned_forever]
        return statistics.median(measured) if measured else self.unmeasured_rate

    @staticmethod
    def _seed(advert: ProviderAdvert, reference: float) -> float:
        return float(min(max(1, advert.macs_per_second), reference))

    def _reseed(self) -> None:
        """Follow the measured median with the seeds of the providers not yet measured."""
        reference = self._reference_rate()
        for s in self._peers.values():
            if not s.measured:
                s.rate = self._seed(s.advert, reference)

    # -- who can be used -----------------------------------------------------------------------

    def holders(self, need: Need) -> list[PeerState]:
        """Providers that could serve `need` at all: live advert, layer held, payload accepted,
        price within `max_price_per_gmac`, the requests' lifetime accepted, not banned for good (they may be busy or banned for a
        while). The one place that says who may be used: plans, choices and hedges all start here."""
        wall = self._wall_ms()
        cap = self.max_price_per_gmac
        return [
            s for s in self._peers.values()
            if s.advert.expires_at_ms > wall
            and (cap is None or s.advert.price_per_gmac <= cap)
            and s.advert.holds(need.model_hash, need.layer_digests)
            and s.advert.max_payload_size >= need.payload
            and (self.request_ttl_ms is None or s.advert.accepts_ttl(self.request_ttl_ms))
            and s.peer.to_base58() not in self._banned_forever
        ]

    def usable(self, state: PeerState) -> bool:
        now = self._clock()
        return state.banned_until <= now and state.busy_until <= now and state.in_flight < state.capacity

    def available(self, need: Need) -> list[PeerState]:
        """Holders that can take a request right now."""
        return [s for s in self.holders(need) if self.usable(s)]

    def ready_in(self, need: Need) -> float:
        """Seconds until a busy or banned holder becomes usable again (inf if none will by time
        alone: then only a freed slot or a new advert helps)."""
        now = self._clock()
        times = [max(s.banned_until, s.busy_until) - now for s in self.holders(need) if s.in_flight < s.capacity]
        return max(0.0, min(times, default=math.inf))

    def describe(self, state: PeerState) -> str:
        """Why a holder is not usable now, for error messages."""
        now = self._clock()
        why = []
        if state.banned_until > now:
            why.append(f"banned for {state.banned_until - now:.0f} s")
        if state.busy_until > now:
            why.append(f"busy for {state.busy_until - now:.1f} s")
        if state.in_flight >= state.capacity:
            why.append(f"all {state.capacity} slot(s) in use")
        return f"{state.peer} ({', '.join(why) or 'usable'})"

    def acquire(self, peer: ID) -> None:
        self._peers[peer].in_flight += 1

    def release(self, peer: ID) -> None:
        self._peers[peer].in_flight -= 1
        self._notify()

    # -- outcomes ------------------------------------------------------------------------------

    def on_success(self, peer: ID, *, elapsed_s: float, compute_s: float, macs: int, amount: int, payload: int = 0,
                   reply: int = 0, reply_s: float = 0.0) -> None:
        """A verified result. `elapsed_s`: from the request's upload starting to its reply's first
        bytes (what an attempt's deadline bounds; the reply's own transfer would make a big output
        look like a slow uplink); `reply_s`: from those first bytes to the last of its `reply` bytes."""
        s = self._peers[peer]
        s.successes += 1
        s.chunks += 1
        s.macs += macs
        s.paid += amount
        s.timeouts_in_row = 0
        s.banned_until = 0.0
        transfer_s = max(elapsed_s - compute_s, 0.0)
        s.latency_s += EWMA * (transfer_s - s.latency_s)
        if payload >= LINK_SAMPLE_MIN_BYTES:
            s.link_bps += EWMA * (payload / max(transfer_s, 1e-3) - s.link_bps)
        if reply >= LINK_SAMPLE_MIN_BYTES:
            measured = reply / max(reply_s, 1e-3)
            s.reply_bps = measured if math.isinf(s.reply_bps) else s.reply_bps + EWMA * (measured - s.reply_bps)
        if compute_s > 0 and macs > 0:
            measured = macs / compute_s
            if s.measured:
                s.rate += EWMA * (measured - s.rate)
            else:  # the seed was a guess: the first measurement replaces it, whatever the advert said
                s.rate, s.measured = measured, True
            self._reseed()
        self._save(s)

    def on_straggler(self, peer: ID, elapsed_s: float) -> None:
        """A hedge beat this provider: it took at least `elapsed_s`, so its latency is at least that."""
        s = self._peers[peer]
        s.latency_s += EWMA * (max(elapsed_s, s.latency_s) - s.latency_s)
        self._save(s)

    def on_failure(self, peer: ID) -> None:
        """A refusal or an error reply: counts against its reputation, no ban."""
        self._peers[peer].failures += 1
        self._save(self._peers[peer])

    def on_busy(self, peer: ID, retry_after_s: float) -> None:
        self._peers[peer].busy_until = self._clock() + retry_after_s
        self._notify()

    def on_timeout(self, peer: ID) -> float:
        """Timed out or unreachable: ban for a while, doubling each time in a row. Returns the ban's length."""
        s = self._peers[peer]
        s.failures += 1
        s.timeouts_in_row += 1
        length = min(self.ban_max_s, self.ban_base_s * 2 ** (s.timeouts_in_row - 1))
        s.banned_until = self._clock() + length
        self._save(s)
        self._notify()
        return length

    def on_cheat(self, peer: ID, reason: str) -> None:
        """A wrong result: banned for good, in the ledger too."""
        self._banned_forever[peer.to_base58()] = reason
        self._ledger.ban(peer.to_base58(), reason)
        if peer in self._peers:
            self._peers[peer].failures += 1
            self._save(self._peers[peer])
        self._notify()

    def forgive(self, peer: ID) -> bool:
        """Lift every ban of `peer` (an operator's decision); False if it was not banned."""
        was = self._ledger.unban(peer.to_base58()) | (self._banned_forever.pop(peer.to_base58(), None) is not None)
        state = self._peers.get(peer)
        if state is not None and state.banned_until > self._clock():
            state.banned_until, state.timeouts_in_row, was = 0.0, 0, True
        self._notify()
        return was

    def _save(self, s: PeerState) -> None:
        self._ledger.save_record(s.peer.to_base58(), TrackRecord(s.successes, s.failures, s.latency_s, s.rate))

    # -- views ---------------------------------------------------------------------------------

    def bans(self) -> dict[str, str]:
        """Every banned peer (base58) and why."""
        now = self._clock()
        bans = dict(self._banned_forever)
        for s in self._peers.values():
            if s.banned_until > now:
                bans[s.peer.to_base58()] = f"timed out {s.timeouts_in_row} time(s) in a row; {s.banned_until - now:.0f} s left"
        return bans

    def views(self) -> tuple[PeerView, ...]:
        bans = self.bans()
        return tuple(_view(s, bans.get(s.peer.to_base58(), "")) for s in self._sorted(self._peers.values()))

    @staticmethod
    def _sorted(states: Iterable[PeerState]) -> list[PeerState]:
        return sorted(states, key=lambda s: s.peer.to_base58())


def _capacity(advert: ProviderAdvert, slots: int) -> int:
    """Requests to send a provider at once: `slots`, at least 1, and fewer than its advertised credit
    (unacknowledged requests per client) so that a receipt still on its way never makes it BUSY."""
    credit = advert.max_unacked - 1 if advert.max_unacked else slots
    return max(1, min(slots, credit))


def _view(s: PeerState, banned: str) -> PeerView:
    a = s.advert
    return PeerView(
        peer=s.peer.to_base58(),
        addrs=tuple(str(addr) for addr in a.addrs),
        device=a.device,
        layers=None if a.layers is None else len(a.layers),
        macs_per_second=a.macs_per_second,
        measured_macs_per_second=s.rate,
        latency_s=s.latency_s,
        price_per_gmac=a.price_per_gmac,
        free_slots=a.free_slots,
        reputation=s.reputation,
        failures=s.failures,
        chunks=s.chunks,
        banned=banned,
        relayed=bool(a.addrs) and all(is_circuit(addr) for addr in a.addrs),
    )
