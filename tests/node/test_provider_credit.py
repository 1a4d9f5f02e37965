"""Admitted work is bounded (protocol README, section 8, "Admission" and "Credit"; node/provider/admission.py):
a provider gives one client identity at most its advertised credit of requests (and of
multiply-accumulates) before their countersigned receipts come back; beyond it the client gets
BUSY from its header, its payload unread, with the time until its first receipt's deadline, while
other clients are served. A countersigned receipt gives the credit back at once. And an admitted
request whose payload lags behind the minimum rate gives its place to a newcomer."""

from __future__ import annotations

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from cipherswarm.node import ModelWeights
from cipherswarm.node.provider.admission import Credit
from cipherswarm.node.identity import signing_key
from cipherswarm.node.streams import close_stream, read_frame, request_reply, send_frame
from cipherswarm.protocol import Busy, countersign_receipt, seal, verify_reply
from cipherswarm.protocol.framing import frame_prefix

from node_factory import running_provider
from test_provider_attacks import REPLY_LIMITS, attacker, make_request, open_stream, outcome
from test_provider_limits import advert_of


def _peer() -> ID:
    return ID.from_pubkey(create_new_key_pair().public_key)


def test_the_credit_counts_requests_and_macs_until_acknowledged_or_their_deadline() -> None:
    credit = Credit(count=2, macs=100, hold_s=30.0)
    greedy, other = _peer(), _peer()
    first = credit.take(greedy, 60, now=0.0)
    assert first is not None
    assert credit.take(greedy, 50, now=0.0) is None  # 110 MACs: over
    assert credit.retry_s(greedy, now=0.0) == float("inf")  # still computed: no deadline yet
    second = credit.take(greedy, 40, now=0.0)
    assert second is not None and credit.outstanding(greedy) == (2, 100)
    assert credit.take(greedy, 1, now=0.0) is None  # 2 requests: over
    assert credit.take(other, 1000, now=0.0) is not None  # another peer, and nothing outstanding: one large request
    credit.settle(greedy, first, now=1.0)
    credit.settle(greedy, second, now=2.0)
    assert credit.retry_s(greedy, now=11.0) == 20.0  # the first reply's deadline, 31 s
    assert credit.take(greedy, 1, now=30.9) is None
    assert credit.take(greedy, 1, now=31.0) is not None  # the first expired unacknowledged
    credit.release(greedy, second)  # acknowledged
    assert credit.outstanding(greedy) == (1, 1)
    assert credit.refusals == 3


async def _served_without_ack(node, provider, weights: ModelWeights) -> None:  # type: ignore[no-untyped-def]
    assert await outcome(node, provider, *make_request(weights)) == "ok"  # the stream closed, no receipt sent


async def test_a_client_that_never_countersigns_gets_its_credit_then_busy_while_another_is_served(
    weights: ModelWeights,
) -> None:
    """max_unacked=3, advertised: a client that never countersigns gets 3 requests served, then
    BUSY from its header with a hint up to the first receipt's deadline (ack_timeout_s 20 s); an
    honest client that countersigns each reply is served 5 times meanwhile, its credit given back
    each time (before: the lazy client was served without bound)."""
    with trio.fail_after(90):
        async with running_provider(weights, max_unacked=3, max_unacked_gmacs=7, ack_timeout_s=20.0) as provider, \
                attacker(provider) as lazy, attacker(provider) as honest:
            advert = await advert_of(honest, provider.node.peer_id)
            assert advert.max_unacked == 3
            for _ in range(3):
                await _served_without_ack(lazy, provider, weights)
            credit = provider.provider.credit
            with trio.fail_after(5):
                while credit.outstanding(lazy.peer_id)[0] != 3:
                    await trio.sleep(0.01)
            request, payload = make_request(weights)
            stream = await open_stream(lazy, provider)
            try:
                sealed = seal(request, signing_key(lazy.key_pair))
                frame = await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=20,
                                            frame_timeout_s=30)
                with pytest.raises(Busy) as caught:
                    verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed)
            finally:
                await close_stream(stream)
            assert caught.value.remote and 10_000 < caught.value.retry_after_ms <= 20_000
            assert frame.header.message.request_id == request.request_id  # type: ignore[union-attr]
            for _ in range(5):
                request, payload = make_request(weights)
                stream = await open_stream(honest, provider)
                try:
                    sealed = seal(request, signing_key(honest.key_pair))
                    frame = await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=20,
                                                frame_timeout_s=30)
                    reply = verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed).message
                    assert reply.ok and reply.receipt is not None
                    ack = countersign_receipt(reply.receipt, signing_key(honest.key_pair))
                    await send_frame(stream, seal(ack, signing_key(honest.key_pair)), timeout_s=5)
                    with trio.fail_after(5):
                        while credit.outstanding(honest.peer_id)[0]:
                            await trio.sleep(0.01)
                finally:
                    await close_stream(stream)
            assert credit.outstanding(lazy.peer_id)[0] == 3
            stats = provider.provider.statistics()
            assert (stats.served, stats.busy, stats.acks) == (8, 1, 5)


async def test_a_lagging_upload_gives_its_place_to_a_newcomer_and_its_peer_is_benched(weights: ModelWeights) -> None:
    """slots=1, queue=0: an identity sends a signed header and 1 KiB of its payload, then stalls,
    holding the only place. An honest request arriving 0.5 s later takes that place (before: BUSY
    until the trickler's 5 s grace ran out); the trickler gets BUSY and its next request BUSY at
    admission, its payload unread."""
    with trio.fail_after(60):
        async with running_provider(weights, slots=1, queue=0) as provider, attacker(provider) as slow, \
                attacker(provider) as honest:
            request, payload = make_request(weights)
            sealed = seal(request, signing_key(slow.key_pair))
            stream = await open_stream(slow, provider)
            try:
                await stream.write(frame_prefix(sealed, payload) + payload[:1024])
                with trio.fail_after(5):
                    while provider.provider.statistics().in_flight != 1:
                        await trio.sleep(0.01)
                await trio.sleep(0.5)
                assert await outcome(honest, provider, *make_request(weights)) == "ok"
                with pytest.raises(Busy):
                    frame = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=5, frame_timeout_s=5)
                    verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed)
            finally:
                await close_stream(stream, reset=True)
            assert await outcome(slow, provider, *make_request(weights)) == "BUSY"
            assert provider.provider.places.evictions == 1
