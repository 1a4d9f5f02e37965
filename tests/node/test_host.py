"""The host's transport choices, its teardown under gossip, and a provider's refusals of bad
requests on a real stream."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import torch
import trio
from libp2p import new_host
from libp2p.abc import ISubscriptionAPI
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from multiaddr import Multiaddr

from cipherswarm.node import ModelWeights, NodeHost, ProviderAdvert, open_host
from cipherswarm.node.discovery import AdvertWatcher
from cipherswarm.node.discovery import now_ms
from cipherswarm.node.engine import BACKEND, ENGINE, encode_params
from cipherswarm.node.identity import peer_id_of, signing_key
from cipherswarm.node.streams import close_stream, request_reply
from cipherswarm.protocol import (
    PROTOCOL_IDS,
    Busy,
    ExpiredFrame,
    Limits,
    MatmulRequest,
    PaymentRequired,
    ProtocolError,
    Range,
    ReplayedFrame,
    ShapeMismatch,
    UnknownModel,
    UnsupportedParams,
    WeightSlice,
    seal,
    verify_reply,
)

from node_factory import running_provider

LAYER = "model.layers.0.self_attn.v_proj.weight"


async def test_noise_identity_is_the_host_identity_and_yamux_the_muxer() -> None:
    a_keys, b_keys = create_new_key_pair(), create_new_key_pair()
    with trio.fail_after(30):
        async with open_host(a_keys) as a, open_host(b_keys) as b:
            assert a.peer_id == peer_id_of(a_keys)
            await b.connect(a.addrs()[0])
            conn = b.host.get_network().get_connections(a.peer_id)[0]
            assert isinstance(conn.muxed_conn, Yamux)
            # Noise authenticated the identity key: the session's remote peer is `a`'s peer id.
            assert conn.muxed_conn.secured_conn.get_remote_peer() == a.peer_id
            assert conn.muxed_conn.secured_conn.get_local_peer() == b.peer_id
            assert all(str(addr).startswith("/ip4/127.0.0.1/") for addr in a.addrs())


async def test_plaintext_only_peer_is_refused() -> None:
    keys = create_new_key_pair()
    plain = new_host(key_pair=keys, sec_opt={PLAINTEXT_PROTOCOL_ID: InsecureTransport(keys)}, muxer_opt={YAMUX_PROTOCOL_ID: Yamux},
                     listen_addrs=[Multiaddr("/ip4/127.0.0.1/tcp/0")])
    with trio.fail_after(30):
        async with open_host(create_new_key_pair()) as node, plain.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
            with pytest.raises(Exception):  # noqa: B017  # whichever dial error py-libp2p raises
                await plain.connect(info_from_p2p_addr(node.addrs()[0]))
            assert not node.connected(plain.get_id())


GOSSIP_TOPIC = "teardown-test"
GOSSIPING_PEERS = 5
TEARDOWNS = 16
"""Each teardown of the test below failed one time in four before pubsub's streams were ended
first (node/host.py, _PubsubStreams), so sixteen miss that race about once in a hundred runs."""


async def _drain(subscription: ISubscriptionAPI) -> None:
    while True:
        await subscription.get()


async def _redial_and_gossip(peer: NodeHost, addr: Multiaddr) -> None:
    """Dial `addr` again as soon as it hangs up (connect_all logs the failed dials of a host that is
    gone) and publish to it without pause."""
    while True:
        await peer.connect_all([addr])
        await peer.pubsub.publish(GOSSIP_TOPIC, b"gossip")
        await trio.sleep(0)


async def test_teardown_survives_peers_that_redial_and_gossip_throughout() -> None:
    """A host hangs up on its peers one after another as it leaves, so the first ones dial back in
    and gossip while its pubsub stops; the teardown must still end cleanly, every time."""
    with trio.fail_after(120):
        async with AsyncExitStack() as stack:
            peers = [await stack.enter_async_context(open_host(create_new_key_pair())) for _ in range(GOSSIPING_PEERS)]
            for _ in range(TEARDOWNS):
                async with trio.open_nursery() as nursery:
                    async with open_host(create_new_key_pair()) as leaving:
                        nursery.start_soon(_drain, await leaving.pubsub.subscribe(GOSSIP_TOPIC))
                        for peer in peers:
                            nursery.start_soon(_redial_and_gossip, peer, leaving.addrs()[0])
                        while not all(leaving.peer_id in peer.pubsub.peers for peer in peers):
                            await trio.sleep(0.01)  # until every peer's gossip reaches `leaving`
                    nursery.cancel_scope.cancel()


async def test_providers_hand_out_their_advert(weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with running_provider(weights, price_per_gmac=3) as provider, open_host(create_new_key_pair()) as other, \
                open_host(create_new_key_pair(), bootstrap=[provider.addr, other.addrs()[0]]) as client:
            seen: list[ProviderAdvert] = []
            watcher = AdvertWatcher(client, weights.model_hash, seen.append)
            await watcher.lookup()  # the provider answers; the other peer, no provider, does not
            assert [a.peer for a in seen] == [provider.node.peer_id]
            assert seen[0].price_per_gmac == 3 and seen[0].addrs == tuple(provider.node.transport_addrs())


def _request(weights: ModelWeights, x: torch.Tensor, *, payload: bytes | None = None, **changes: object) -> tuple[MatmulRequest, bytes]:
    layer = weights.resolve(LAYER)
    params = ENGINE.params_for(layer.weight.q, 8)  # type: ignore[union-attr]
    payload = ENGINE.encrypt(ENGINE.keygen(params), x).to_bytes() if payload is None else payload
    fields: dict[str, object] = dict(
        expires_at_ms=now_ms() + 30_000, model_hash=weights.model_hash, layer=layer.name,
        weight_slice=WeightSlice(rows=Range(0, 64), cols=Range(0, 64)), transpose=False, backend=BACKEND,
        backend_params=encode_params(params), input_shape=tuple(x.shape), output_shape=(x.shape[0], 64), price_per_gmac=10,
    )
    fields.update(changes)
    return MatmulRequest.for_payload(payload, **fields), payload  # type: ignore[arg-type]


async def _ask(node: object, peer: ID, request: MatmulRequest, payload: bytes) -> None:
    """Send one request on a fresh stream; raises the provider's refusal."""
    stream = await node.host.new_stream(peer, list(PROTOCOL_IDS))  # type: ignore[attr-defined]
    try:
        sealed = seal(request, signing_key(node.key_pair))  # type: ignore[attr-defined]
        frame = await request_reply(stream, sealed, payload, limits=Limits(max_payload_size=1 << 24),
                                    read_timeout_s=10, frame_timeout_s=20)
        verify_reply(frame, peer=peer.to_bytes(), request=sealed)
    finally:
        await close_stream(stream)


@pytest.mark.parametrize(
    ("changes", "error"),
    [
        (dict(layer="model.layers.0.self_attn.nope.weight"), UnknownModel),
        (dict(model_hash=b"x" * 32), UnknownModel),
        (dict(backend="clear"), UnsupportedParams),
        (dict(price_per_gmac=1), PaymentRequired),
        (dict(expires_at_ms=1), ExpiredFrame),
    ],
)
async def test_provider_refuses_bad_requests(weights: ModelWeights, changes: dict[str, object], error: type[ProtocolError]) -> None:
    with trio.fail_after(60):
        async with running_provider(weights, price_per_gmac=5) as provider, open_host(create_new_key_pair()) as node:
            await node.connect(provider.addr)
            x = torch.randint(-128, 128, (10, 64))
            with pytest.raises(error) as caught:
                await _ask(node, provider.node.peer_id, *_request(weights, x, **changes))
            assert caught.value.remote


async def test_provider_refuses_a_replay_and_mismatched_parameters(weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with running_provider(weights) as provider, open_host(create_new_key_pair()) as node:
            await node.connect(provider.addr)
            x = torch.randint(-128, 128, (10, 64))
            request, payload = _request(weights, x)
            await _ask(node, provider.node.peer_id, request, payload)
            with pytest.raises(ReplayedFrame):
                await _ask(node, provider.node.peer_id, request, payload)
            other = ENGINE.params_for(torch.full((64, 64), 127), 8)  # heavier weights' parameters
            mismatched, payload = _request(weights, x, backend_params=encode_params(other))
            with pytest.raises(ShapeMismatch, match="payload_length"):  # not the ciphertext these parameters make
                await _ask(node, provider.node.peer_id, mismatched, payload)
            under_other = ENGINE.encrypt(ENGINE.keygen(other), x).to_bytes()
            mismatched, payload = _request(weights, x, backend_params=encode_params(other), payload=under_other)
            with pytest.raises(UnsupportedParams):  # a well-formed ciphertext, under parameters these weights break
                await _ask(node, provider.node.peer_id, mismatched, payload)
            assert provider.provider.statistics().errors == 3


async def test_provider_at_capacity_answers_busy_before_reading(weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with running_provider(weights, slots=1, queue=0, delay_s=3.0) as provider, open_host(create_new_key_pair()) as node:
            await node.connect(provider.addr)
            x = torch.randint(-128, 128, (10, 64))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_ask, node, provider.node.peer_id, *_request(weights, x))
                while provider.provider.statistics().in_flight == 0:
                    await trio.sleep(0.01)
                with pytest.raises(Busy) as caught:
                    await _ask(node, provider.node.peer_id, *_request(weights, x))
                assert caught.value.retry_after_ms >= 50
            stats = provider.provider.statistics()
            assert (stats.busy, stats.served, stats.peak_in_flight) == (1, 1, 1)
            with trio.fail_after(5):  # released once the provider sees the client close (no ack here)
                while provider.provider.statistics().in_flight:
                    await trio.sleep(0.01)
