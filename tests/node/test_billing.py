"""What the client pays: the advertised price, never more, and only providers it can afford.

Real libp2p hosts on 127.0.0.1 (node_factory), except the first test, which checks the receipt
rule on hand-made frames. The overbilling provider is a real provider in its `overbill` cheat
mode (provider/cheat.py): honest results, receipts signed at twice its advertised price.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

import cipherswarm.node.client.dispatch as dispatch
from cipherswarm.node import Ledger, ModelWeights, NoProvidersError
from cipherswarm.node.client.config import ClientConfig
from cipherswarm.node.client.router import AttemptFailed, FailureKind
from cipherswarm.node.identity import signing_key
from cipherswarm.node.provider import Cheat
from cipherswarm.protocol import (
    Limits,
    MatmulRequest,
    Range,
    Verified,
    WeightSlice,
    decode_frame,
    encode_frame,
    ok_reply,
    seal,
)
from cipherswarm.protocol.messages import sha256
from cipherswarm.protocol.signing import peer_id

from node_factory import providers, random_operand, reference, session

LAYER = "model.layers.1.mlp.down_proj"  # 128 -> 64
GMAC = 10**9
TEST_S = 60


def _check(receipt_price: int, *, offered: int, advertised: int) -> None:
    """check_reply on a provider's reply charging `receipt_price` to a request offering `offered`."""
    client_key, provider_key = signing_key(create_new_key_pair()), signing_key(create_new_key_pair())
    provider = ID(peer_id(provider_key.public_key()))
    payload, result = bytes(range(32)), bytes(range(100, 140))
    request = MatmulRequest.for_payload(
        payload, expires_at_ms=2**40, model_hash=sha256(b"model"), layer="model.layers.0.mlp.up_proj",
        weight_slice=WeightSlice(rows=Range(0, 16), cols=Range(0, 32)), transpose=False, backend="rlwe",
        backend_params=b"\x01", input_shape=(4, 16), output_shape=(4, 32), price_per_gmac=offered,
    )
    sealed = seal(request, client_key)
    received = Verified(request, sealed.signer, sealed.digest, payload)
    reply = ok_reply(received, result, key=provider_key, price_per_gmac=receipt_price, compute_time_us=1, now_ms=1)
    frame = decode_frame(encode_frame(seal(reply, provider_key), result), limits=Limits(max_payload_size=1 << 16))
    dispatch.check_reply(frame, peer=provider, request=sealed, payload_sha256=sha256(result), advert_price=advertised)


def test_a_receipt_above_the_advert_is_a_cheat_even_within_the_offer() -> None:
    advertised = 5 * GMAC
    _check(advertised, offered=advertised, advertised=advertised)
    _check(advertised - 1, offered=advertised, advertised=advertised)  # charging less is the provider's business
    with pytest.raises(AttemptFailed, match="overbilled") as failed:
        _check(advertised + 1, offered=2 * advertised, advertised=advertised)
    assert failed.value.kind is FailureKind.CHEATED
    # what the client offers: the advert's price, capped by the most the user pays
    assert dispatch.offer(advertised, ClientConfig(max_price_per_gmac=advertised + 1)) == advertised
    assert dispatch.offer(advertised, ClientConfig(max_price_per_gmac=advertised - 1)) == advertised - 1


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[tuple[ID, MatmulRequest]]]:
    """Every request the client's dispatcher seals, with the provider it is for."""
    seen: list[tuple[ID, MatmulRequest]] = []

    class Spy(dispatch.Exchange):
        def __init__(self, node: Any, peer: ID, request: Callable[[], Any], *args: Any, **kwargs: Any) -> None:
            def recorded() -> Any:
                sealed = request()
                seen.append((peer, sealed.message))
                return sealed

            super().__init__(node, peer, recorded, *args, **kwargs)

    monkeypatch.setattr(dispatch, "Exchange", Spy)
    yield seen


async def _calls(client: Any, weights: ModelWeights, count: int) -> None:
    n = client.keys.channel(client.weights.resolve(LAYER), transpose=False).params.n
    for _ in range(count):
        x = random_operand(2 * n, 128)  # two ring blocks: two chunks
        assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))


async def test_overbilling_provider_is_refused_banned_and_not_paid(
    weights: ModelWeights, sent: list[tuple[ID, MatmulRequest]]
) -> None:
    price = 2 * GMAC
    with trio.fail_after(TEST_S), Ledger() as ledger:
        async with providers(weights, [dict(slots=1, price_per_gmac=price),
                                       dict(slots=1, price_per_gmac=price, cheat=Cheat.OVERBILL)]) as (honest, cheat):
            bad = cheat.node.peer_id  # advertises `price`, signs its receipts at twice that
            async with session(weights, [honest.addr, cheat.addr], ledger=ledger, min_providers=2, split="blocks") as client:
                await _calls(client, weights, 3)  # every result exact, through the honest provider
                stats = client.stats()
            assert cheat.provider.statistics().served >= 1  # it was asked, computed and sent its receipt ...
            assert cheat.provider.statistics().acks == 0  # ... which was never countersigned
        assert all(request.price_per_gmac == price for _, request in sent)  # never offered more than advertised
        assert stats.verification_failures == 1 and stats.key_rotations == 1  # the same path as a wrong result
        assert bad.to_base58() in stats.bans and "receipt" in ledger.bans()[bad.to_base58()]
        receipts = [signed.receipt for signed in ledger.receipts()]
        assert receipts and {r.provider for r in receipts} == {honest.node.peer_id.to_bytes()}
        assert all(r.price_per_gmac == price for r in receipts)
        assert stats.paid == ledger.total_amount() == sum(r.macs for r in receipts) * price // GMAC
        assert stats.chunks_by_peer == {honest.node.peer_id.to_base58(): len(receipts)}


async def test_requests_offer_the_advertised_price_and_the_ledger_holds_exactly_that(
    weights: ModelWeights, sent: list[tuple[ID, MatmulRequest]]
) -> None:
    prices = [1 * GMAC, 3 * GMAC]  # both below the default maximum (2^32), which is never offered
    with trio.fail_after(TEST_S), Ledger() as ledger:
        async with providers(weights, [dict(slots=1, price_per_gmac=p) for p in prices]) as running:
            advertised = {r.node.peer_id: p for r, p in zip(running, prices)}
            async with session(weights, [r.addr for r in running], ledger=ledger, min_providers=2, split="blocks") as client:
                await _calls(client, weights, 3)
                stats = client.stats()
        assert sent and {peer for peer, _ in sent} == set(advertised)  # both were used
        assert all(request.price_per_gmac == advertised[peer] for peer, request in sent)
        receipts = [signed.receipt for signed in ledger.receipts()]
        advertised = {peer.to_bytes(): price for peer, price in advertised.items()}  # receipts name peers by bytes
        assert {r.provider for r in receipts} == set(advertised)
        for r in receipts:
            assert r.price_per_gmac == advertised[r.provider]
            assert r.amount == r.macs * advertised[r.provider] // GMAC  # whole units: the prices are whole per MAC
        assert stats.macs == sum(r.macs for r in receipts)
        assert stats.paid == ledger.total_amount() == sum(r.macs * advertised[r.provider] // GMAC for r in receipts)


async def test_a_provider_dearer_than_the_users_maximum_is_never_sent_a_request(
    weights: ModelWeights, sent: list[tuple[ID, MatmulRequest]]
) -> None:
    limit = 100
    with trio.fail_after(TEST_S), Ledger() as ledger:
        async with providers(weights, [dict(slots=1, price_per_gmac=limit), dict(slots=1, price_per_gmac=limit + 1)]) as (
            cheap, dear,
        ):
            async with session(weights, [cheap.addr, dear.addr], ledger=ledger, min_providers=2, split="blocks",
                               max_price_per_gmac=limit) as client:
                assert len(client.peers) == 2  # it knows the dear one ...
                await _calls(client, weights, 3)
                stats = client.stats()
            assert dear.provider.statistics().requests == 0  # ... and never opened a stream to it
        assert sent and {peer for peer, _ in sent} == {cheap.node.peer_id}
        assert all(request.price_per_gmac == limit for _, request in sent)
        assert set(stats.chunks_by_peer) == {cheap.node.peer_id.to_base58()}
        assert stats.paid == ledger.total_amount() > 0
        # only dear providers: the call fails instead of paying more
        async with providers(weights, [dict(price_per_gmac=limit + 1)]) as (alone,):
            async with session(weights, [alone.addr], wait_providers_s=5.0, max_price_per_gmac=limit) as client:
                with pytest.raises(NoProvidersError):
                    await _calls(client, weights, 1)
            assert alone.provider.statistics().requests == 0
