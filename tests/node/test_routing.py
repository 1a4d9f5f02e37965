"""The peer table and the router without a network: scores, bans, waiting, and chunk plans."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from cipherswarm.node import ClientConfig, Ledger, ProviderAdvert
from cipherswarm.node.client.peers import Need, PeerTable
from cipherswarm.node.client.router import AttemptFailed, CallShape, ChunkRouter, FailureKind, plan_cost
from cipherswarm.node.discovery import now_ms

MODEL = b"m" * 32
LAYER = b"l" * 32
NEED = Need(MODEL, (LAYER,), payload=1000, macs=10**6)


def advert(*, layers: frozenset[bytes] | None = None, free_slots: int = 2, price: int = 0, issued_ms: int | None = None,
           macs_per_second: int = 10**9) -> ProviderAdvert:
    issued = now_ms() if issued_ms is None else issued_ms
    return ProviderAdvert(
        peer=ID.from_pubkey(create_new_key_pair().public_key),
        addrs=(),
        models=frozenset({MODEL}),
        layers=layers,
        backends=("rlwe",),
        protocols=("/cipherswarm/matmul/1.0.0",),
        device="cpu",
        macs_per_second=macs_per_second,
        price_per_gmac=price,
        free_slots=free_slots,
        max_payload_size=1 << 20,
        issued_at_ms=issued,
        expires_at_ms=issued + 60_000,
    )


class TestPeerTable:
    async def test_timeouts_ban_with_doubling_backoff_and_success_resets_it(self, autojump_clock: trio.abc.Clock) -> None:
        table = PeerTable(ledger=Ledger(), ban_base_s=10, ban_max_s=35)
        a = advert()
        table.update(a)
        assert [table.on_timeout(a.peer) for _ in range(4)] == [10, 20, 35, 35]
        assert table.available(NEED) == [] and "4 time(s) in a row" in table.bans()[a.peer.to_base58()]
        await trio.sleep(34)
        assert table.available(NEED) == []
        await trio.sleep(2)
        assert [s.peer for s in table.available(NEED)] == [a.peer]
        table.on_success(a.peer, elapsed_s=0.1, compute_s=0.05, macs=10**6, amount=0)
        assert table.on_timeout(a.peer) == 10

    async def test_cheaters_are_banned_for_good_across_restarts(self, tmp_path: Path) -> None:
        a, b = advert(), advert()
        with Ledger(tmp_path / "l.sqlite") as ledger:
            table = PeerTable(ledger=ledger)
            table.update(a)
            table.update(b)
            table.on_cheat(a.peer, "flipped a value")
            assert [s.peer for s in table.holders(NEED)] == [b.peer]
        with Ledger(tmp_path / "l.sqlite") as ledger:
            table = PeerTable(ledger=ledger)
            table.update(a)  # its adverts are ignored from now on
            assert len(table) == 0 and table.bans() == {a.peer.to_base58(): "flipped a value"}
            assert table.forgive(a.peer)
            table.update(a)
            assert [s.peer for s in table.available(NEED)] == [a.peer]

    async def test_a_forgiven_provider_is_usable_at_once_on_the_advert_it_sent_while_banned(self) -> None:
        """Its adverts keep coming while it is banned; were they dropped, its last one could lapse and
        leave it unknown after `forgive` until its next advert (seconds of work sent elsewhere)."""
        first = advert()
        table = PeerTable(ledger=Ledger(), wall_ms=lambda: first.issued_at_ms + 90_000)  # `first` has lapsed
        fresh = dataclasses.replace(first, issued_at_ms=first.issued_at_ms + 80_000, expires_at_ms=first.issued_at_ms + 140_000)
        table.update(first)
        table.on_cheat(first.peer, "flipped a value")
        table.update(fresh)  # heard while banned
        assert table.holders(NEED) == []
        assert table.forgive(first.peer)
        assert [s.peer for s in table.available(NEED)] == [first.peer]

    async def test_measured_record_is_kept_for_the_next_session(self, tmp_path: Path) -> None:
        a = advert()
        with Ledger(tmp_path / "l.sqlite") as ledger:
            table = PeerTable(ledger=ledger)
            table.update(a)
            table.on_success(a.peer, elapsed_s=0.3, compute_s=0.1, macs=5 * 10**8, amount=3)
            table.on_failure(a.peer)
            before = table.get(a.peer)
        with Ledger(tmp_path / "l.sqlite") as ledger:
            table = PeerTable(ledger=ledger)
            table.update(a)
            after = table.get(a.peer)
            assert (after.successes, after.failures) == (1, 1)
            assert after.latency_s == pytest.approx(before.latency_s) and after.rate == pytest.approx(before.rate)
            assert after.reputation == pytest.approx(0.5)

    async def test_deadlines_cover_the_payload_transfer_and_the_link_is_measured(self) -> None:
        table = PeerTable(ledger=Ledger(), link_bps=1e6)
        a = advert()
        table.update(a)
        router = ChunkRouter(table, ClientConfig(timeout_min_s=1.0, hedge_min_s=0.1))
        state, macs, payload = table.get(a.peer), 10**8, 30 * 10**6  # 0.1 s of compute, 30 s at the assumed link
        assert state.expected_s(macs, payload) == pytest.approx(30.0 + 0.1)
        assert router.attempt_timeout(state, macs, payload) == 60.0  # the request's lifetime caps it
        assert router.hedge_delay(state, macs, payload) == pytest.approx(3 * 30.1)
        assert router.hedge_delay(state, macs) == pytest.approx(3 * (state.latency_s + 0.1))  # no payload: compute only
        # a fast link measured on a large payload: 30 MB in 0.3 s beside 0.1 s of compute
        for _ in range(20):
            table.on_success(a.peer, elapsed_s=0.4, compute_s=0.1, macs=macs, amount=0, payload=payload)
        assert state.link_bps == pytest.approx(1e8, rel=1e-3)
        assert state.expected_s(macs, payload) == pytest.approx(0.3 + 0.1, rel=1e-3)
        # small payloads measure latency only, never the link
        table.on_success(a.peer, elapsed_s=5.0, compute_s=0.1, macs=macs, amount=0, payload=1000)
        assert state.link_bps == pytest.approx(1e8, rel=1e-3) and state.latency_s > 1.0

    def test_link_rate_must_be_positive(self) -> None:
        with pytest.raises(ValueError, match="link_bps"):
            ClientConfig(link_bps=0)

    async def test_adverts_filter_by_layer_payload_expiry_and_age(self) -> None:
        table = PeerTable(ledger=Ledger())
        holder, other = advert(layers=frozenset({LAYER})), advert(layers=frozenset({b"x" * 32}))
        table.update(holder)
        table.update(other)
        assert [s.peer for s in table.holders(NEED)] == [holder.peer]
        assert table.holders(Need(MODEL, (LAYER,), payload=2 << 20, macs=1)) == []  # over its payload limit
        table.update(dataclasses.replace(holder, issued_at_ms=holder.issued_at_ms - 1, free_slots=7))
        assert table.get(holder.peer).advert == holder  # an older advert never replaces a newer one
        stale = PeerTable(ledger=Ledger(), wall_ms=lambda: now_ms() + 120_000)
        stale.update(holder)
        assert stale.holders(NEED) == []  # expired

    async def test_slots_limit_requests_in_flight(self) -> None:
        table = PeerTable(ledger=Ledger())
        a = advert(free_slots=1)
        table.update(a)
        table.acquire(a.peer)
        assert table.available(NEED) == []
        table.release(a.peer)
        assert len(table.available(NEED)) == 1


class TestRouter:
    async def test_pick_spreads_then_prefers_score_and_avoids_failed(self) -> None:
        table = PeerTable(ledger=Ledger(), max_price_per_gmac=100)
        router = ChunkRouter(table, ClientConfig(max_price_per_gmac=100))
        fast, slow, dear = advert(), advert(), advert(price=1000)
        for a in (fast, slow, dear):
            table.update(a)
        table.get(slow.peer).rate = 10**6
        assert router.pick(NEED, avoid={}).peer == fast.peer
        table.acquire(fast.peer)
        assert router.pick(NEED, avoid={}).peer == slow.peer  # spread before stacking
        table.release(fast.peer)
        assert router.pick(NEED, avoid={fast.peer: 1}).peer == slow.peer
        assert router.pick(NEED, avoid={fast.peer: 1, slow.peer: 1}).peer == fast.peer  # dear: never

    async def test_one_chunk_calls_try_every_provider_once_then_not_the_slow_one(self) -> None:
        table = PeerTable(ledger=Ledger())
        router = ChunkRouter(table, ClientConfig())
        equals, slow = [advert() for _ in range(3)], advert()
        for a in (*equals, slow):
            table.update(a)
        table.get(equals[1].peer).rate = 0.9e9  # a hair slower: still an equal
        table.get(slow.peer).rate = 10**6
        served = []
        for _ in range(7):  # one call after another, one chunk each
            state = router.pick(NEED, avoid={})
            assert state is not None
            table.on_success(state.peer, elapsed_s=0.02, compute_s=0.0, macs=0, amount=0)
            served.append(state.peer)
        # each is tried once (the slow one too: never measured, it is judged by a seed), then not the slow one
        assert set(served[:4]) == {a.peer for a in (*equals, slow)}
        assert served.count(slow.peer) == 1

    async def test_providers_dearer_than_the_users_maximum_are_not_holders(self) -> None:
        table = PeerTable(ledger=Ledger(), max_price_per_gmac=100)
        router = ChunkRouter(table, ClientConfig(max_price_per_gmac=100, wait_providers_s=1))
        cheap, at_limit, dear = advert(price=5), advert(price=100), advert(price=101)
        for a in (cheap, at_limit, dear):
            table.update(a)
        assert {s.peer for s in table.holders(NEED)} == {cheap.peer, at_limit.peer}  # what plans are made for
        picked = set()
        for _ in range(6):  # pick and hold: every usable slot of the affordable two, then nothing
            state = router.pick(NEED, avoid={})
            if state is None:
                break
            table.acquire(state.peer)
            picked.add(state.peer)
        assert picked == {cheap.peer, at_limit.peer}
        table.update(dataclasses.replace(cheap, price_per_gmac=1000, issued_at_ms=cheap.issued_at_ms + 1))
        table.update(dataclasses.replace(at_limit, price_per_gmac=1000, issued_at_ms=at_limit.issued_at_ms + 1))
        for a in (cheap, at_limit):
            for _ in range(2):
                table.release(a.peer)
        assert table.holders(NEED) == [] and router.pick(NEED, avoid={}) is None  # a price rise takes them out too


def _covers_exactly(chunks: list, shape: CallShape) -> bool:
    """Every (block, contraction index, output index) cell is in exactly one chunk."""
    cells = [
        (b, c, o)
        for ch in chunks
        for b, c, o in itertools.product(range(ch.blocks.start, ch.blocks.stop), range(ch.contraction.start, ch.contraction.stop), range(ch.output.start, ch.output.stop))
    ]
    return len(cells) == len(set(cells)) == shape.blocks * shape.contraction * shape.output


class TestPlan:
    @pytest.mark.parametrize(
        ("split", "tokens", "providers", "max_payload", "kinds"),
        [
            ("auto", 100, 3, 10**9, (1, 1, 1)),  # one block, three providers, a slow link: sent whole
            ("auto", 5000, 3, 10**9, (3, 1, 1)),  # three blocks: token blocks
            ("auto", 5000, 2, 10**9, (2, 1, 1)),
            ("auto", 100, 3, 8_000, (1, 6, 1)),  # a block does not fit: rows of at most 3 features (6 KiB)
            ("auto", 5000, 1, 40_000, (3, 1, 1)),  # one provider, payloads must fit: more block groups
            ("auto", 16 * 2048, 3, 40_000, (16, 1, 1)),  # a block fits, two do not: one block per group
            ("auto", 16 * 2048, 3, 70_000, (8, 1, 1)),  # two blocks fit: pairs
            ("rows", 16 * 2048, 2, 40_000, (8, 2, 1)),  # half-blocks: two per group fit
            ("blocks", 100, 3, 10**9, (1, 1, 1)),
            ("rows", 5000, 2, 10**9, (1, 2, 1)),
            ("columns", 5000, 2, 10**9, (1, 1, 2)),
        ],
    )
    def test_plans_cover_the_product_exactly(self, split: str, tokens: int, providers: int, max_payload: int, kinds: tuple[int, int, int]) -> None:
        shape = CallShape(tokens=tokens, n=2048, contraction=16, output=12, in_bytes=1, out_bytes=1)
        router = ChunkRouter(PeerTable(ledger=Ledger()), ClientConfig(split=split))  # type: ignore[arg-type]
        chunks = router.plan(shape, providers=providers, max_payload=max_payload, link_bps=1.0, rate=math.inf)  # bytes count
        groups = len({c.blocks for c in chunks}), len({c.contraction for c in chunks}), len({c.output for c in chunks})
        assert groups == kinds
        assert _covers_exactly(chunks, shape)
        assert all(c.row_parts == groups[1] for c in chunks)
        if max_payload < 10**9:  # every chunk's input fits the payload limit
            assert max(len(c.blocks) * len(c.contraction) * shape.n * shape.in_bytes for c in chunks) <= max_payload
        assert [c.index for c in chunks] == list(range(len(chunks)))


class TestPlanByBytes:
    """auto chooses the split by the bytes it moves through the client's link."""

    LAYER = dict(n=4096, contraction=4096, output=4096, in_bytes=7, out_bytes=10)  # a LLaMA-8B projection

    def test_token_blocks_move_each_input_once_when_there_are_enough(self) -> None:
        shape = CallShape(tokens=8 * 4096, **self.LAYER)
        router = ChunkRouter(PeerTable(ledger=Ledger()), ClientConfig())
        chunks = router.plan(shape, providers=3, max_payload=1 << 30)  # even on an infinitely fast link
        cost = plan_cost(shape, chunks, providers=3, link_bps=1.0, rate=1.0)
        assert len({c.output for c in chunks}) == 1 and chunks[0].row_parts == 1
        assert cost.bytes_up == 8 * 4096 * 4096 * 7 and cost.bytes_down == 8 * 4096 * 4096 * 10

    @pytest.mark.parametrize(("link_bps", "rate", "columns"), [
        (6.25e6, 5e12, 1),  # a 50 Mbit/s uplink to GPUs: 2 more copies of 117 MB cost 37 s, save 9 ms
        (1e12, 1e9, 2),  # a LAN to slow CPUs: 0.1 s more on the link saves 34 s (a third part would not
        # shorten the widest chunk: W has 4 column blocks)
    ])
    def test_one_block_is_replicated_only_when_that_buys_time(self, link_bps: float, rate: float, columns: int) -> None:
        shape = CallShape(tokens=4096, **self.LAYER)
        router = ChunkRouter(PeerTable(ledger=Ledger()), ClientConfig())
        chunks = router.plan(shape, providers=3, max_payload=1 << 30, link_bps=link_bps, rate=rate)
        assert len(chunks) == columns and len({c.output for c in chunks}) == columns
        up = plan_cost(shape, chunks, providers=3, link_bps=link_bps, rate=rate).bytes_up
        assert up == columns * 4096 * 4096 * 7

    async def test_plan_for_reads_the_link_and_rate_the_table_measured(self) -> None:
        table = PeerTable(ledger=Ledger())
        router = ChunkRouter(table, ClientConfig())
        ads = [dataclasses.replace(advert(), max_payload_size=1 << 30) for _ in range(3)]
        for a in ads:
            table.update(a)
        shape = CallShape(tokens=4096, **self.LAYER)
        for a in ads:
            table.get(a.peer).link_bps, table.get(a.peer).rate = 1e12, 1e9
        assert len(router.plan_for(shape, table.holders(NEED), layer="l")) == 2
        for a in ads:  # measured a 50 Mbit/s uplink to GPUs that reply over 50 Mbit/s uplinks too
            table.get(a.peer).link_bps = table.get(a.peer).reply_bps = 6.25e6
            table.get(a.peer).rate = 5e12
        assert len(router.plan_for(shape, table.holders(NEED), layer="l")) == 1
        for a in ads:  # providers that reply at a tenth of that: halving each reply is worth a second copy
            table.get(a.peer).reply_bps = 6.25e5
        assert len(router.plan_for(shape, table.holders(NEED), layer="l")) == 2


BIG = Need(MODEL, (LAYER,), payload=1000, macs=10**10)  # compute dominates: 10 s at 10^9 MAC/s


class TestSeededRates:
    """A provider's advert cannot make it look faster than the swarm has been measured."""

    async def test_unmeasured_rates_are_capped_by_the_measured_median(self, tmp_path: Path) -> None:
        with Ledger(tmp_path / "l.sqlite") as ledger:
            table = PeerTable(ledger=ledger, unmeasured_rate=1e9)
            honest, claims_more, claims_less = advert(), advert(macs_per_second=10**12), advert(macs_per_second=10**8)
            for a in (honest, claims_more, claims_less):
                table.update(a)
            # nothing measured yet: a fixed conservative rate, or the advert's own if lower
            assert [table.get(a.peer).rate for a in (honest, claims_more, claims_less)] == [1e9, 1e9, 1e8]
            table.on_success(honest.peer, elapsed_s=1.1, compute_s=1.0, macs=3 * 10**9, amount=0)
            assert table.get(honest.peer).rate == 3e9  # the first measurement replaces the seed
            assert table.get(claims_more.peer).rate == 3e9  # re-seeded: the measured median, not 10^12
            assert table.get(claims_less.peer).rate == 1e8
            newer = dataclasses.replace(claims_more, macs_per_second=10**15, issued_at_ms=claims_more.issued_at_ms + 1)
            table.update(newer)  # a louder advert changes nothing
            assert table.get(claims_more.peer).rate == 3e9
            table.on_failure(claims_more.peer)  # saves its record: a seed, never measured
        with Ledger(tmp_path / "l.sqlite") as ledger:
            table = PeerTable(ledger=ledger, unmeasured_rate=1e9)
            table.update(newer)
            table.update(honest)
            assert table.get(honest.peer).rate == 3e9 and table.get(honest.peer).measured  # earned in the last session
            assert table.get(newer.peer).failures == 1 and not table.get(newer.peer).measured
            assert table.get(newer.peer).rate <= 3e9  # its saved seed is not taken for a measurement

    async def test_a_sybil_claiming_100x_gets_one_probe_not_the_chunks_of_a_measured_provider(self) -> None:
        # Before: the Sybil was seeded with its own advert (10^11 MAC/s) and a measurement moved that
        # by only 30 %, so after its probe it still looked ~70x faster and took every chunk.
        table = PeerTable(ledger=Ledger())
        router = ChunkRouter(table, ClientConfig())
        true_rate = {}
        honest = advert(macs_per_second=10**9)
        table.update(honest)
        true_rate[honest.peer] = 1e9
        for _ in range(3):  # already measured
            table.on_success(honest.peer, elapsed_s=10.05, compute_s=10.0, macs=BIG.macs, amount=0)
        sybil = advert(macs_per_second=10**11)
        table.update(sybil)
        true_rate[sybil.peer] = 0.5e9  # it computes at half the honest rate
        assert table.get(sybil.peer).rate <= table.get(honest.peer).rate
        assert router.score(table.get(sybil.peer), BIG.macs) >= router.score(table.get(honest.peer), BIG.macs) / 1.01
        served = []
        for _ in range(10):  # one-chunk calls, one after another
            state = router.pick(BIG, avoid={})
            assert state is not None
            compute = BIG.macs / true_rate[state.peer]
            table.on_success(state.peer, elapsed_s=compute + 0.05, compute_s=compute, macs=BIG.macs, amount=0)
            served.append(state.peer)
        assert served.count(sybil.peer) == 1  # its probe (router.pick's never-served rule), nothing after
        assert table.get(sybil.peer).rate == pytest.approx(0.5e9)  # judged by what it did, not what it claimed

    async def test_an_honest_fast_newcomer_is_measured_by_its_first_chunk_and_then_gets_the_work(self) -> None:
        table = PeerTable(ledger=Ledger())
        router = ChunkRouter(table, ClientConfig())
        old, fast = advert(macs_per_second=10**9), advert(macs_per_second=10**10)
        true_rate = {old.peer: 1e9, fast.peer: 1e10}
        table.update(old)
        table.on_success(old.peer, elapsed_s=10.05, compute_s=10.0, macs=BIG.macs, amount=0)
        table.update(fast)
        assert table.get(fast.peer).rate == 1e9  # seeded at the measured median, not its (true) claim
        served = []
        for _ in range(6):
            state = router.pick(BIG, avoid={})
            assert state is not None
            compute = BIG.macs / true_rate[state.peer]
            table.on_success(state.peer, elapsed_s=compute + 0.05, compute_s=compute, macs=BIG.macs, amount=0)
            served.append(state.peer)
        assert served == [fast.peer] * 6  # probed at once, then preferred on its measurement
        assert table.get(fast.peer).rate == pytest.approx(1e10)

    async def test_plans_use_seeds_not_claims(self) -> None:
        # the plan's cost model reads the holders' mean rate: a claim of 10^15 MAC/s must not make
        # compute look free (it would stop a slow swarm's call being spread over more providers)
        shape = CallShape(tokens=4096, **TestPlanByBytes.LAYER)
        plans = []
        for claim in (10**9, 10**15):
            table = PeerTable(ledger=Ledger())
            router = ChunkRouter(table, ClientConfig())
            ads = [dataclasses.replace(advert(macs_per_second=claim), max_payload_size=1 << 30) for _ in range(3)]
            for a in ads:
                table.update(a)
            measured = ads[0].peer
            table.on_success(measured, elapsed_s=1.0, compute_s=1.0, macs=10**9, amount=0)  # 10^9 MAC/s
            for a in ads:
                table.get(a.peer).link_bps = 1e12
            plans.append(router.plan_for(shape, table.holders(NEED), layer="l"))
        assert plans[0] == plans[1] and len(plans[0]) == 2  # a LAN to slow CPUs: worth a second copy
