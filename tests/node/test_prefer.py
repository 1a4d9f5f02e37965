"""The client's preference (ClientConfig.prefer; node/client/router.py, "Preference"): whom a real
PeerTable fed real adverts sends chunks to under price, speed and balanced; the plan's width; the
simulator, which runs the same router; and the --prefer flag of train and testnet."""

from __future__ import annotations

from collections import Counter

import pytest
from libp2p.peer.id import ID

from cipherswarm.cli.main import build_parser
from cipherswarm.cli.train import client_config
from cipherswarm.node import ClientConfig, Ledger, ProviderAdvert
from cipherswarm.node.client.peers import INITIAL_LATENCY_S, UNMEASURED_RATE, PeerTable
from cipherswarm.node.client.router import PREFERENCES, CallShape, ChunkRouter
from cipherswarm.node.sim import ClientSpec, ProviderSpec, Swarm, Workload, simulate
from cipherswarm.trainer.finetune import BUNDLED_MODEL
from cipherswarm.trainer.workload import traced_model

from test_routing import NEED, advert

PRICES = (10, 20, 30)


def market(prefer: str, prices: tuple[int, ...] = PRICES, *, served: bool = False,
           **config: object) -> tuple[ChunkRouter, list[ProviderAdvert]]:
    """A router over a real table holding one advert per price (equal advertised MAC/s, 2 slots
    each); `served`: each has served one chunk, measured as exactly as fast as the others."""
    settings = ClientConfig(prefer=prefer, **config)  # type: ignore[arg-type]
    table = PeerTable.for_client(settings, Ledger(), clock=lambda: 0.0)  # time stands still: bans and BUSY last
    adverts = [advert(price=p) for p in prices]
    for a in adverts:
        table.update(a)
        if served:
            serve(table, a.peer)
    return ChunkRouter(table, settings), adverts


def serve(table: PeerTable, peer: ID) -> None:
    """A chunk of NEED served by `peer` at what every provider is assumed to do before it is
    measured (1e9 MAC/s, 50 ms): all providers stay equally fast."""
    compute_s = NEED.macs / UNMEASURED_RATE
    table.on_success(peer, elapsed_s=INITIAL_LATENCY_S + compute_s, compute_s=compute_s, macs=NEED.macs, amount=0)


def one_at_a_time(router: ChunkRouter, calls: int) -> Counter[ID]:
    """Chunks served per provider when calls of one chunk each run one after another (the testnet's
    case: the trainer's calls are sequential), all providers equally fast (`serve`)."""
    served: Counter[ID] = Counter()
    for _ in range(calls):
        state = router.pick(NEED, avoid={})
        assert state is not None
        serve(router.table, state.peer)
        served[state.peer] += 1
    return served


def fill(router: ChunkRouter) -> list[ID]:
    """Pick and hold slots until none is left: the order providers are given concurrent chunks."""
    order = []
    while (state := router.pick(NEED, avoid={})) is not None:
        router.table.acquire(state.peer)
        order.append(state.peer)
    return order


class TestScore:
    def test_the_score_is_expected_time_over_reputation_weighed_by_price(self) -> None:
        for prefer, (_, a) in PREFERENCES.items():
            router, (cheap, _, dear) = market(prefer)
            for a_ in (cheap, dear):
                state = router.table.get(a_.peer)
                expected = state.expected_s(NEED.macs, NEED.payload) / state.reputation * (a_.price_per_gmac + 1) ** a
                assert router.score(state, NEED.macs, NEED.payload) == pytest.approx(expected)
        speed, (cheap, _, dear) = market("speed")
        assert speed.score(speed.table.get(cheap.peer), NEED.macs) == speed.score(speed.table.get(dear.peer), NEED.macs)

    def test_the_pool_is_the_prices_within_the_preferences_factor_of_the_cheapest(self) -> None:
        pools = {}
        for prefer in PREFERENCES:
            router, adverts = market(prefer, served=True)
            pool = router.pool([router.table.get(a.peer) for a in adverts])
            pools[prefer] = [s.advert.price_per_gmac for s in pool]
        assert pools == {"speed": [10, 20, 30], "balanced": [10, 20], "price": [10]}  # 21 <= 2 x 11 < 31

    def test_a_provider_that_never_served_is_in_every_pool_once(self) -> None:
        router, adverts = market("price")
        states = [router.table.get(a.peer) for a in adverts]
        assert router.pool(states) == states  # each is measured (and a cheater met) by one chunk
        serve(router.table, adverts[2].peer)
        assert [s.advert.price_per_gmac for s in router.pool(states)] == [10, 20]


class TestPick:
    def test_speed_ignores_price_and_shares_calls_among_equals(self) -> None:
        router, adverts = market("speed")
        served = one_at_a_time(router, 30)
        assert [served[a.peer] for a in adverts] == [10, 10, 10]

    def test_price_sends_every_sequential_call_to_the_cheapest_once_each_is_measured(self) -> None:
        router, (cheap, middle, dear) = market("price")
        assert one_at_a_time(router, 30) == Counter({cheap.peer: 28, middle.peer: 1, dear.peer: 1})

    def test_balanced_prefers_the_cheaper_where_it_has_the_choice(self) -> None:
        router, (cheap, middle, dear) = market("balanced")
        served = one_at_a_time(router, 30)
        assert served == Counter({cheap.peer: 28, middle.peer: 1, dear.peer: 1})  # measured once, then time x price

    def test_price_uses_the_others_once_the_cheapest_is_full_or_busy(self) -> None:
        router, (cheap, middle, dear) = market("price", served=True)
        # concurrent chunks: the cheapest's 2 slots first, then the next price's, then the dearest's
        assert fill(router) == [cheap.peer] * 2 + [middle.peer] * 2 + [dear.peer] * 2
        for a in (cheap, middle, dear):
            for _ in range(2):
                router.table.release(a.peer)
        router.table.on_busy(cheap.peer, 5.0)  # its BUSY reply: the run goes on at the next price
        assert router.pick(NEED, avoid={}).peer == middle.peer
        assert router.pick(NEED, avoid={middle.peer: 1}).peer == dear.peer  # a retry is not starved either

    def test_balanced_spreads_concurrent_chunks_within_twice_the_cheapest_usable_price(self) -> None:
        router, (cheap, middle, dear) = market("balanced", served=True)
        # 10 and 20 share until 10 is full; then 20 is the cheapest usable, and 30 is within twice it
        assert fill(router) == [cheap.peer, middle.peer, cheap.peer, dear.peer, middle.peer, dear.peer]

    def test_balanced_pays_for_time_price_does_not(self) -> None:
        """A provider at twice the price measured four times faster: worth it under balanced only."""
        chosen = {}
        for prefer in ("balanced", "price"):
            router, (cheap, fast) = market(prefer, prices=(10, 20))
            for a, compute_s in ((cheap, 0.4), (fast, 0.1)):  # each measured once
                router.table.on_success(a.peer, elapsed_s=compute_s + 0.001, compute_s=compute_s, macs=10**9, amount=0)
            big = NEED.__class__(NEED.model_hash, NEED.layer_digests, payload=NEED.payload, macs=10**9)
            chosen[prefer] = router.pick(big, avoid={}).advert.price_per_gmac
        assert chosen == {"balanced": 20, "price": 10}


def test_a_call_is_planned_for_the_preferences_pool() -> None:
    """Three blocks of tokens: one chunk per provider the preference would use."""
    shape = CallShape(tokens=3 * 64, n=64, contraction=64, output=64, in_bytes=8, out_bytes=8)
    widths = {}
    for prefer in PREFERENCES:
        router, adverts = market(prefer, served=True, split="blocks")
        widths[prefer] = len(router.plan_for(shape, [router.table.get(a.peer) for a in adverts], layer="l"))
    assert widths == {"speed": 3, "balanced": 2, "price": 1}


def test_the_simulator_pays_what_the_preference_chooses() -> None:
    """The simulator runs the same router: on three equal providers at 10/20/30 per GMAC, price pays
    the cheapest's price (but for one chunk measuring each of the others), speed about their mean,
    balanced in between."""
    work = Workload(traced_model(BUNDLED_MODEL), tokens=2048, micro_batch_tokens=2048, seq_len=128)
    swarm = Swarm(ClientSpec(up_bps=1e8, down_bps=1e8),
                  tuple(ProviderSpec(macs_per_s=2e9, rtt_s=0.02, price_per_gmac=p) for p in PRICES), seed=1)
    tallies = {prefer: simulate(work, swarm, ClientConfig(prefer=prefer)).tally for prefer in PREFERENCES}  # type: ignore[arg-type]
    per_gmac = {prefer: t.paid / (t.macs / 1e9) for prefer, t in tallies.items()}
    assert per_gmac["price"] < 12.0  # 10, but for the two measuring chunks among some 30
    assert per_gmac["speed"] > 15.0
    assert per_gmac["price"] < per_gmac["balanced"] <= per_gmac["speed"]


class TestFlag:
    @pytest.mark.parametrize("command", ["train", "testnet"])
    @pytest.mark.parametrize("prefer", ["price", "speed", "balanced"])
    def test_prefer_reaches_the_clients_config(self, command: str, prefer: str) -> None:
        extra = ["--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"] if command == "train" else []
        args = build_parser(command).parse_args([command, *extra, "--prefer", prefer])
        assert client_config(args).prefer == prefer

    def test_balanced_by_default_and_max_price_kept(self) -> None:
        args = build_parser("train").parse_args(["train", "--bootstrap", "a", "--max-price", "25"])
        assert (client_config(args).prefer, client_config(args).max_price_per_gmac) == ("balanced", 25)

    def test_an_unknown_preference_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            build_parser("train").parse_args(["train", "--bootstrap", "a", "--prefer", "cheap"])
        assert "invalid choice: 'cheap'" in capsys.readouterr().err
        with pytest.raises(ValueError, match="prefer must be price, speed or balanced"):
            ClientConfig(prefer="cheap")  # type: ignore[arg-type]

    @pytest.mark.parametrize("command", ["train", "testnet"])
    def test_the_stated_uplink_reaches_the_upload_gate(self, command: str) -> None:
        extra = ["--bootstrap", "/ip4/127.0.0.1/tcp/1/p2p/x"] if command == "train" else []
        args = build_parser(command).parse_args([command, *extra, "--uplink-mbit", "1000"])
        assert client_config(args).uplink_bps == 125e6  # bytes/s
        unset = build_parser(command).parse_args([command, *extra])
        assert client_config(unset).uplink_bps == 0.0  # unknown: big uploads one at a time

    def test_a_negative_uplink_is_refused(self, capsys: pytest.CaptureFixture[str]) -> None:
        with pytest.raises(SystemExit):
            build_parser("train").parse_args(["train", "--bootstrap", "a", "--uplink-mbit", "-1"])
        assert "must be 0 or more" in capsys.readouterr().err
