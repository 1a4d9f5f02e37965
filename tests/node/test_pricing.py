"""A provider's dynamic price (node/provider/pricing.py): the rule on a hand-driven clock, the flags
that set it, and a real provider on 127.0.0.1 whose advert follows its load and which honours the
price it just advertised while refusing offers below its minimum or a price it dropped long ago."""

from __future__ import annotations

import pytest
import trio
from libp2p.peer.id import ID

from cipherswarm.cli.main import build_parser
from cipherswarm.cli.provider import price_options
from cipherswarm.node import ModelWeights, ProviderAdvert, ProviderConfig
from cipherswarm.node.discovery import AdvertWatcher
from cipherswarm.node.identity import signing_key
from cipherswarm.node.provider.admission import Credit
from cipherswarm.node.provider.pricing import MAX_ADVERTISED, Pricing
from cipherswarm.node.streams import close_stream, request_reply
from cipherswarm.protocol import PaymentRequired, seal, verify_reply

from node_factory import Running, running_provider
from test_provider_attacks import REPLY_LIMITS, attacker, make_request, open_stream


class Clock:
    """Seconds set by the test."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pricing(clock: Clock, **changes: float) -> Pricing:
    fields: dict[str, float] = dict(low=10, high=110, ramp_s=10.0, honour_s=4.0)
    fields.update(changes)
    return Pricing(clock=clock, **fields)  # type: ignore[arg-type]


class TestRule:
    def test_rises_while_saturated_holds_in_between_and_falls_while_idle_within_the_bounds(self) -> None:
        clock = Clock()
        price = pricing(clock)  # 10 units a second either way
        assert price.current() == 10 and price.dynamic
        price.observe(1.0)  # every slot taken
        clock.now = 3.0
        assert price.current() == 40
        price.observe(0.7)  # busy, not full: holds
        clock.now = 5.0
        assert price.current() == 40
        price.observe(0.0)  # idle: falls
        clock.now = 6.0
        assert price.current() == 30
        clock.now = 100.0
        assert price.current() == 10  # never below low
        price.observe(2.0)  # slots and queue full
        clock.now = 200.0
        assert price.current() == 110  # never above high

    def test_a_fixed_price_never_moves(self) -> None:
        clock = Clock()
        price = pricing(clock, low=25, high=25)
        price.observe(5.0)
        clock.now = 1e6
        assert (price.current(), price.floor(), price.charge(40), price.dynamic) == (25, 25, 25, False)

    def test_prices_advertised_within_the_honour_window_are_accepted_and_charged_as_offered(self) -> None:
        clock = Clock()
        price = pricing(clock, honour_s=4.0)
        assert price.advertise() == 10  # a client acts on this advert ...
        price.observe(1.0)  # ... while the provider fills up
        clock.now = 2.0
        assert price.current() == 30 and price.floor() == 10  # the offer of 10 is still honoured
        assert price.charge(10) == 10  # and charged as offered, not at 30
        assert price.advertise() == 30
        clock.now = 4.5  # 10 was advertised 4.5 s ago: no longer honoured; 30 was, 2.5 s ago
        assert price.current() == 55 and price.floor() == 30
        clock.now = 7.0
        assert price.floor() == 80  # nothing advertised within 4 s: the current price
        price.observe(0.0)
        clock.now = 9.0
        assert price.floor() == 60 and price.charge(80) == 60  # an offer above the current price pays the current one

    def test_the_advertised_history_is_bounded(self) -> None:
        clock = Clock()
        price = pricing(clock, high=10_000, ramp_s=1.0, honour_s=1e9)
        price.observe(1.0)
        for _ in range(3 * MAX_ADVERTISED):
            clock.now += 1e-3  # a new price every advert
            price.advertise()
        assert len(price._advertised) == MAX_ADVERTISED
        assert price.floor() > 10  # the oldest prices were dropped: only stricter

    @pytest.mark.parametrize("fields", [dict(low=20, high=10), dict(low=-1, high=10), dict(start=5),
                                        dict(start=200), dict(ramp_s=0.0), dict(honour_s=-1.0)])
    def test_invalid_settings_are_refused(self, fields: dict[str, float]) -> None:
        with pytest.raises(ValueError):
            pricing(Clock(), **fields)

    @pytest.mark.parametrize("load", [-0.1, float("nan"), float("inf")])
    def test_invalid_loads_are_refused(self, load: float) -> None:
        with pytest.raises(ValueError, match="load"):
            pricing(Clock()).observe(load)

    def test_a_clients_share_of_its_credit_is_load(self) -> None:
        peer = ID(b"\x00\x04peer")
        credit = Credit(count=4, macs=100, hold_s=10.0)
        assert credit.load(now=0.0) == 0.0
        first = credit.take(peer, 10, now=0.0)
        credit.take(peer, 80, now=0.0)
        assert credit.load(now=0.0) == pytest.approx(0.9)  # 90 of 100 MACs beats 2 of 4 requests
        assert first is not None
        credit.settle(peer, first, now=0.0)
        credit.release(peer, first)
        assert credit.load(now=0.0) == pytest.approx(0.8)


class TestFlags:
    def test_the_price_flags_reach_the_providers_config(self) -> None:
        parse = build_parser("provider").parse_args
        fixed = ProviderConfig(**price_options(parse(["provider", "--model", "m", "--price", "7"])))  # type: ignore[arg-type]
        assert (fixed.price_per_gmac, fixed.min_price_per_gmac, fixed.max_price_per_gmac) == (7, None, None)
        assert not fixed.pricing().dynamic
        args = parse(["provider", "--model", "m", "--min-price", "5", "--max-price", "50", "--price-ramp", "30"])
        dynamic = ProviderConfig(**price_options(args))  # type: ignore[arg-type]
        assert (dynamic.price_per_gmac, dynamic.min_price_per_gmac, dynamic.max_price_per_gmac) == (5, 5, 50)
        rule = dynamic.pricing(clock=lambda: 0.0)
        assert (rule.low, rule.high, rule.ramp_s, rule.dynamic) == (5, 50, 30.0, True)
        assert dynamic.pricing().honour_s == 2 * dynamic.advert_interval_s
        assert ProviderConfig(**price_options(parse(["provider", "--model", "m"]))).price_per_gmac == 0  # type: ignore[arg-type]

    @pytest.mark.parametrize("fields", [dict(min_price_per_gmac=5), dict(max_price_per_gmac=50),
                                        dict(price_per_gmac=60, min_price_per_gmac=5, max_price_per_gmac=50)])
    def test_a_dynamic_price_needs_both_bounds_around_its_start(self, fields: dict[str, int]) -> None:
        with pytest.raises(ValueError):
            ProviderConfig(**fields)  # type: ignore[arg-type]


# -- a real provider --------------------------------------------------------------------------------

LOW, HIGH = 10, 1010
HONOUR_S = 4.0  # two advert intervals of 2 s
SATURATED_S = 8.0  # each request's delay: the one compute slot stays taken this long


async def _advert(node: object, provider: Running) -> ProviderAdvert:
    """The provider's advert as a client fetches it (ADVERT_PROTOCOL_ID), verified."""
    seen: list[ProviderAdvert] = []
    await AdvertWatcher(node, None, seen.append).lookup()  # type: ignore[arg-type]  # connected peers only: no DHT wait
    (advert,) = [a for a in seen if a.peer == provider.node.peer_id]
    return advert


async def _charged(weights: ModelWeights, provider: Running, offer: int, results: dict[str, int | str], name: str) -> None:
    """A request offering `offer` from an identity of its own: the receipt's price, or the refusal's code."""
    async with attacker(provider) as node:
        request, payload = make_request(weights, price_per_gmac=offer)
        sealed = seal(request, signing_key(node.key_pair))
        stream = await open_stream(node, provider)
        try:
            frame = await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=30, frame_timeout_s=40)
            reply = verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed)
            assert reply.message.receipt is not None
            results[name] = reply.message.receipt.receipt.price_per_gmac
        except PaymentRequired as exc:
            assert exc.remote
            results[name] = f"PAYMENT, asked {exc.asked}"
        finally:
            await close_stream(stream)


async def test_a_providers_dynamic_price_is_advertised_and_the_price_just_advertised_is_honoured(weights: ModelWeights) -> None:
    """One compute slot, each product delayed 8 s, price 10-1010 rising 100 a second while saturated:
    the advert shows 10 while idle and more once a request holds the slot; a request offering the 10
    just advertised is accepted and its receipt charges 10; one offering 9 (below the minimum) is
    refused, and so is 10 once no advert has asked it for more than two advert intervals."""
    with trio.fail_after(60):
        async with running_provider(weights, price_per_gmac=LOW, min_price_per_gmac=LOW, max_price_per_gmac=HIGH,
                                    price_ramp_s=10.0, slots=1, queue=3, delay_s=SATURATED_S) as provider, \
                attacker(provider) as client, trio.open_nursery() as nursery:
            first = await _advert(client, provider)
            assert first.price_per_gmac == LOW  # idle since it started: at its minimum
            results: dict[str, int | str] = {}
            nursery.start_soon(_charged, weights, provider, LOW, results, "saturating")
            while len(provider.provider.places) == 0:  # the slot is taken: saturated from here
                await trio.sleep(0.01)
            saturated_at = trio.current_time()  # no advert asks 10 for long after this
            nursery.start_soon(_charged, weights, provider, LOW, results, "just advertised")
            await _charged(weights, provider, LOW - 1, results, "below the minimum")
            await trio.sleep(1.0)
            risen = await _advert(client, provider)
            assert LOW < risen.price_per_gmac <= HIGH
            await trio.sleep(max(0.0, saturated_at + HONOUR_S + 0.5 - trio.current_time()))  # 10 was last asked > 4 s ago
            assert trio.current_time() - saturated_at < SATURATED_S - 2  # still saturated
            await _charged(weights, provider, LOW, results, "stale")
        assert results["saturating"] == LOW and results["just advertised"] == LOW  # charged as agreed, not the risen price
        assert results["below the minimum"] == f"PAYMENT, asked {LOW}"  # 10 was just advertised: the floor
        stale = results["stale"]
        assert isinstance(stale, str) and stale.startswith("PAYMENT") and int(stale.split()[-1]) > LOW
