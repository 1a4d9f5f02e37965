"""A provider under attack, on real libp2p hosts on 127.0.0.1 (node/provider/service.py, admission.py;
protocol README sections 2 and 8): streams trickling their header, refused requests with a huge
declared payload, clients that never acknowledge, refused requests filling the replay window, and
one identity (or one address) taking every place. Each attacker is a real host sending real,
signed frames; each test checks that an honest request is still served, and how fast."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
import torch
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.host.exceptions import StreamFailure
from libp2p.peer.id import ID

from cipherswarm.node import ModelWeights, NodeHost, open_host
from cipherswarm.node.discovery import now_ms
from cipherswarm.node.engine import BACKEND, ENGINE, encode_params
from cipherswarm.node.identity import signing_key
from cipherswarm.node.provider.gate import StreamGate
from cipherswarm.node.streams import close_stream, read_frame, request_reply, send_bytes
from cipherswarm.protocol import (
    PROTOCOL_IDS,
    BadSignature,
    Busy,
    DeadlineExceeded,
    Limits,
    MatmulRequest,
    PaymentRequired,
    ProtocolError,
    Range,
    Sealed,
    UnknownModel,
    WeightSlice,
    encode_frame,
    seal,
    verify_reply,
)
from cipherswarm.protocol.framing import frame_prefix
from cipherswarm.protocol.signing import encode_public_key
from cipherswarm.protocol.varint import encode_uvarint

from node_factory import Running, random_operand, reference, running_provider, session

LAYER = "model.layers.0.mlp.gate_proj"  # 64 -> 128
REPLY_LIMITS = Limits(max_payload_size=1 << 24)


def make_request(weights: ModelWeights, tokens: int = 4, **changes: object) -> tuple[MatmulRequest, bytes]:
    """A valid request for LAYER's first 64 columns and its encrypted operand."""
    layer = weights.resolve(LAYER)
    params = ENGINE.params_for(layer.weight.q, 8)  # type: ignore[union-attr]
    payload = ENGINE.encrypt(ENGINE.keygen(params), torch.randint(-128, 128, (tokens, 64))).to_bytes()
    fields: dict[str, object] = dict(
        expires_at_ms=now_ms() + 30_000, model_hash=weights.model_hash, layer=layer.name,
        weight_slice=WeightSlice(rows=Range(0, 64), cols=Range(0, 64)), transpose=False, backend=BACKEND,
        backend_params=encode_params(params), input_shape=(tokens, 64), output_shape=(tokens, 64), price_per_gmac=10,
    )
    fields.update(changes)
    return MatmulRequest.for_payload(payload, **fields), payload  # type: ignore[arg-type]


@asynccontextmanager
async def attacker(provider: Running) -> AsyncIterator[NodeHost]:
    """A host of its own (its own identity), connected to the provider."""
    async with open_host(create_new_key_pair()) as node:
        await node.connect(provider.addr)
        yield node


async def open_stream(node: NodeHost, provider: Running) -> INetStream:
    return await node.host.new_stream(provider.node.peer_id, list(PROTOCOL_IDS))


async def ended(stream: INetStream) -> None:
    """Return once the provider has ended the stream (closed or reset it), reading what is left."""
    try:
        while await stream.read(1024):
            pass
    except Exception:  # noqa: BLE001  # libp2p ends a stream with StreamEOF or StreamReset
        pass


async def ask(node: NodeHost, provider: Running, request: MatmulRequest, payload: bytes, *, sent: bytes | None = None) -> None:
    """One request on a fresh stream, the payload `sent` in place of `payload` if given; raises the
    provider's refusal (the reply checked as a client does)."""
    stream = await open_stream(node, provider)
    try:
        sealed = seal(request, signing_key(node.key_pair))
        frame = await request_reply(stream, sealed, payload if sent is None else sent, limits=REPLY_LIMITS,
                                    read_timeout_s=20, frame_timeout_s=30)
        verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed)
    finally:
        await close_stream(stream)


async def outcome(node: NodeHost, provider: Running, request: MatmulRequest, payload: bytes) -> str:
    """"ok", or the error code's name of the provider's refusal."""
    try:
        await ask(node, provider, request, payload)
    except ProtocolError as exc:
        assert exc.remote, exc
        return exc.code.name
    return "ok"


# --- (a) trickling streams ------------------------------------------------------------------------


async def test_trickling_streams_do_not_lock_out_an_honest_client(weights: ModelWeights) -> None:
    """Eight streams, each sending a valid request one byte a second and opened again as soon as the
    provider cuts it, for as long as the test runs. They hold no compute place (before: all four
    places for 60 s each, and every honest request got BUSY); each is cut by the header deadline
    (5 s) with TIMEOUT; an honest client's call meanwhile completes, without a BUSY."""
    with trio.fail_after(60):
        async with running_provider(weights) as provider, attacker(provider) as evil:
            request, payload = make_request(weights)
            frame = encode_frame(seal(request, signing_key(evil.key_pair)), payload)
            cut_after: list[float] = []
            answers: list[str] = []

            async def trickle_forever() -> None:
                while True:
                    try:
                        stream = await open_stream(evil, provider)
                    except StreamFailure:  # struck: reset before negotiation (gate.py) until its next token
                        await trio.sleep(0.2)
                        continue
                    opened = trio.current_time()
                    async with trio.open_nursery() as nursery:

                        async def write() -> None:
                            try:
                                for byte in frame:
                                    # cancel-safe (streams.py): the cancellation below must not land
                                    # inside a write, which would break this attacker's connection
                                    await send_bytes(stream, bytes([byte]), timeout_s=5)
                                    await trio.sleep(1)
                            except Exception:  # noqa: BLE001  # the provider reset the stream
                                pass

                        nursery.start_soon(write)
                        try:
                            reply = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=30, frame_timeout_s=30)
                            error = reply.header.message.error  # type: ignore[union-attr]
                            answers.append("?" if error is None else error.code.name)
                        except Exception:  # noqa: BLE001  # reset without a reply also ends it
                            answers.append("reset")
                        cut_after.append(trio.current_time() - opened)
                        nursery.cancel_scope.cancel()
                    await close_stream(stream, reset=True)

            async with trio.open_nursery() as nursery:
                for _ in range(8):
                    nursery.start_soon(trickle_forever)
                await trio.sleep(2)
                stats = provider.provider.statistics()
                assert len(provider.provider.opening) == 8 and stats.in_flight == 0  # not one place held
                async with session(weights, [provider.addr]) as client:
                    x = random_operand(16, 64)
                    started = trio.current_time()
                    assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                    assert trio.current_time() - started < 10
                    assert client.stats().busy == 0
                    chunks = client.stats().chunks
                while len(cut_after) < 8:  # every first trickler has been cut once
                    await trio.sleep(0.1)
                nursery.cancel_scope.cancel()
            assert all(4.5 < t < 9 for t in cut_after), cut_after  # the header deadline, not the 60 s frame one
            # TIMEOUT (a reset only if the trickler's next byte met the reset stream before it read the reply)
            assert set(answers) <= {"TIMEOUT", "reset"} and "TIMEOUT" in answers, answers
            stats = provider.provider.statistics()
            assert stats.busy == 0 and stats.peak_in_flight <= chunks  # only the honest chunks ever held a place


# --- (b) refused before the payload -----------------------------------------------------------------


def _flip_signature(sealed: Sealed[MatmulRequest]) -> bytes:
    """The frame's prefix (varint and header) with the signature's last byte changed."""
    header = bytearray(sealed.header)
    header[-1] ^= 1  # the envelope ends with the 64 signature bytes
    return encode_uvarint(len(header)) + bytes(header)


@pytest.mark.parametrize(
    ("attack", "error"),
    [("bad signature", BadSignature), ("unknown model", UnknownModel), ("offer too low", PaymentRequired)],
)
async def test_a_refused_request_is_answered_before_its_huge_payload_is_read(
    weights: ModelWeights, attack: str, error: type[ProtocolError]
) -> None:
    """A header declaring 256 MiB of payload that fails a check the header alone decides (its
    signature, the model, the price) is answered right after the header, before a byte of the
    payload is sent, and never admitted (no place: no payload buffered); the few MB sent after the
    answer are discarded. Before, the provider read and hashed the whole payload first."""
    with trio.fail_after(60):
        async with running_provider(weights, price_per_gmac=5) as provider, attacker(provider) as evil:
            request, _ = make_request(weights, **({"model_hash": b"\x07" * 32} if attack == "unknown model" else {}),
                                      **({"price_per_gmac": 1} if attack == "offer too low" else {}))
            request = dataclasses.replace(request, payload_length=256 << 20, payload_sha256=b"\x01" * 32)
            sealed = seal(request, signing_key(evil.key_pair))
            prefix = _flip_signature(sealed) if attack == "bad signature" else encode_uvarint(len(sealed.header)) + sealed.header
            stream = await open_stream(evil, provider)
            try:
                started = trio.current_time()
                await stream.write(prefix)  # the header only: no payload byte yet
                with trio.fail_after(5):
                    reply = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=5, frame_timeout_s=5)
                answered_s = trio.current_time() - started
                with pytest.raises(error) as caught:
                    verify_reply(reply, peer=provider.node.peer_id.to_bytes(), request=sealed)
                assert caught.value.remote
                # then a few MB of the payload: discarded (or the stream reset), never buffered
                with trio.move_on_after(10):
                    try:
                        await send_bytes(stream, bytes(4 << 20), timeout_s=10)
                    except Exception:  # noqa: BLE001  # the provider may have reset the stream
                        pass
            finally:
                await close_stream(stream, reset=True)
            assert answered_s < 3
            stats = provider.provider.statistics()
            assert (stats.errors, stats.served, stats.peak_in_flight) == (1, 0, 0)
            assert len(provider.provider.window) == 0  # and the refused request used no nonce
            # an honest request is served right after
            async with attacker(provider) as honest:
                assert await outcome(honest, provider, *make_request(weights)) == "ok"


# --- (c) the place is free while the ack is awaited ---------------------------------------------------


async def test_a_client_that_never_acknowledges_does_not_hold_the_only_place(weights: ModelWeights) -> None:
    """slots=1, queue=0: a client reads its reply and keeps the stream open without sending the
    countersigned receipt (the provider waits up to 30 s for it). The place is free as soon as the
    reply is sent, so the next honest request is served at once, not BUSY (before: BUSY for 30 s)."""
    with trio.fail_after(60):
        async with running_provider(weights, slots=1, queue=0) as provider, attacker(provider) as lazy, \
                attacker(provider) as honest:
            request, payload = make_request(weights)
            stream = await open_stream(lazy, provider)
            try:
                sealed = seal(request, signing_key(lazy.key_pair))
                frame = await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=20,
                                            frame_timeout_s=30)
                assert verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed).message.ok
                # no ack: the provider is waiting for it, holding no place
                with trio.fail_after(5):
                    while len(provider.provider.acks) != 1 or provider.provider.statistics().in_flight:
                        await trio.sleep(0.01)
                started = trio.current_time()
                assert await outcome(honest, provider, *make_request(weights)) == "ok"
                assert trio.current_time() - started < 10
                assert len(provider.provider.acks) == 1  # still waiting for the lazy client
            finally:
                await close_stream(stream)
            stats = provider.provider.statistics()
            assert (stats.served, stats.busy, stats.peak_in_flight) == (2, 0, 1)


async def test_waits_for_acks_are_bounded_dropping_the_oldest(weights: ModelWeights) -> None:
    """max_ack_waiters=2: a third client that does not acknowledge drops the wait of the first,
    whose stream the provider then closes."""
    with trio.fail_after(60):
        async with running_provider(weights, max_ack_waiters=2) as provider, attacker(provider) as lazy:
            streams = []
            try:
                for _ in range(3):
                    request, payload = make_request(weights)
                    stream = await open_stream(lazy, provider)
                    streams.append(stream)
                    sealed = seal(request, signing_key(lazy.key_pair))
                    await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=20, frame_timeout_s=30)
                    with trio.fail_after(5):  # the provider reaches its wait for this ack
                        while provider.provider.statistics().in_flight:
                            await trio.sleep(0.01)
                with trio.fail_after(5):  # the first stream ends: the provider stopped waiting
                    await ended(streams[0])
                assert len(provider.provider.acks) == 2 and provider.provider.acks.evictions == 1
            finally:
                for stream in streams:
                    await close_stream(stream)


# --- (d) the replay window ------------------------------------------------------------------------


async def test_refused_requests_use_no_nonce_and_one_key_cannot_fill_the_window(weights: ModelWeights) -> None:
    """A replay window of 8 nonces, 3 per key. Twenty UNKNOWN_MODEL and UNSUPPORTED_PARAMS requests
    leave it empty (before: each used a nonce, and a full window answered everyone BUSY for up to
    two minutes). A key that
    uses its 3 nonces (requests whose payload then fails its digest) gets BUSY; another key is served."""
    with trio.fail_after(60):
        # strikes: the gate (gate.py) would turn this key's streams away after its third refusal;
        # what is tested here is what reaches the window
        async with running_provider(weights, replay_capacity=8, replay_per_key=3, strikes=1000) as provider, \
                attacker(provider) as evil, attacker(provider) as honest:
            window = provider.provider.window
            for i in range(20):  # whole, authentic requests, refused for what their header names
                refused, payload = make_request(weights, **({"model_hash": b"\x07" * 32} if i % 2 else {"backend": "clear"}))
                assert await outcome(evil, provider, refused, payload) == ("UNKNOWN_MODEL" if i % 2 else "UNSUPPORTED_PARAMS")
            assert len(window) == 0
            for _ in range(3):  # authentic headers, nonces used; payloads not the ones signed
                request, payload = make_request(weights)
                with pytest.raises(BadSignature):
                    await ask(evil, provider, request, payload, sent=bytes(len(payload)))
            assert window.held(scope=encode_public_key(signing_key(evil.key_pair).public_key())) == 3
            with pytest.raises(Busy) as caught:
                await ask(evil, provider, *make_request(weights))
            assert caught.value.retry_after_ms > 20_000  # until its own oldest nonce expires (30 s requests)
            assert await outcome(honest, provider, *make_request(weights)) == "ok"
            assert len(window) == 4


# --- (e) shares per peer and per address ------------------------------------------------------------


async def _flood(node: NodeHost, provider: Running, weights: ModelWeights, count: int, results: list[str]) -> None:
    async with trio.open_nursery() as nursery:
        for _ in range(count):
            request, payload = make_request(weights)

            async def one(request: MatmulRequest = request, payload: bytes = payload) -> None:
                results.append(await outcome(node, provider, request, payload))

            nursery.start_soon(one)


async def test_one_identity_gets_busy_beyond_its_share_while_another_is_served(weights: ModelWeights) -> None:
    """slots=2, queue=2, each product held 3 s: one identity opening 4 requests at once gets 2
    admitted (its share: `slots`) and BUSY for the others, at once; another identity's request is
    admitted meanwhile (before: the first identity held all four places and it got BUSY)."""
    with trio.fail_after(60):
        async with running_provider(weights, slots=2, queue=2, delay_s=3.0) as provider, \
                attacker(provider) as greedy, attacker(provider) as honest:
            results: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_flood, greedy, provider, weights, 4, results)
                with trio.fail_after(10):
                    while results.count("BUSY") < 2 or provider.provider.statistics().in_flight < 2:
                        await trio.sleep(0.01)
                assert provider.provider.places.held_by(greedy.peer_id) == 2
                assert await outcome(honest, provider, *make_request(weights)) == "ok"
            assert sorted(results) == ["BUSY", "BUSY", "ok", "ok"]
            stats = provider.provider.statistics()
            assert (stats.served, stats.busy, stats.peak_in_flight) == (3, 2, 3)


async def test_one_address_gets_busy_beyond_its_share(weights: ModelWeights) -> None:
    """With loopback not exempted, two identities from 127.0.0.1 share one address's places
    (max_per_address=2), while the provider still has free places; the share frees as they finish."""
    with trio.fail_after(60):
        async with running_provider(weights, slots=2, queue=2, delay_s=3.0, exempt_loopback=False,
                                    max_per_address=2) as provider, \
                attacker(provider) as first, attacker(provider) as second:
            results: list[str] = []
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_flood, first, provider, weights, 2, results)
                with trio.fail_after(10):
                    while provider.provider.statistics().in_flight < 2:
                        await trio.sleep(0.01)
                assert provider.provider.places.held_at("127.0.0.1") == 2
                assert await outcome(second, provider, *make_request(weights)) == "BUSY"
            assert results == ["ok", "ok"]
            assert await outcome(second, provider, *make_request(weights)) == "ok"


async def test_too_many_opening_streams_of_one_peer_get_busy_and_the_oldest_opener_is_evicted(
    weights: ModelWeights,
) -> None:
    """The opening pool: one peer's streams beyond max_opening_per_peer get BUSY at once; when the
    pool is full, a new stream evicts the oldest opener (reset), and is itself served."""
    with trio.fail_after(60):
        async with running_provider(weights, max_opening=3, max_opening_per_peer=2) as provider, \
                attacker(provider) as first, attacker(provider) as second, attacker(provider) as honest:
            silent = [await open_stream(node, provider) for node in (first, first, second)]
            try:
                with trio.fail_after(5):
                    while provider.provider.statistics().requests < 3:
                        await trio.sleep(0.01)
                # a third silent stream of `first`: over its share of openers
                assert await outcome(first, provider, *make_request(weights)) == "BUSY"
                assert len(provider.provider.opening) == 3
                # the pool is full: an honest stream evicts the oldest silent one, and is served
                assert await outcome(honest, provider, *make_request(weights)) == "ok"
                assert provider.provider.opening.evictions == 1
                with trio.fail_after(5):  # the evicted stream: BUSY, then the stream ends
                    reply = await read_frame(silent[0], limits=REPLY_LIMITS, read_timeout_s=5, frame_timeout_s=5)
                    await ended(silent[0])
                assert reply.header.message.error.code.name == "BUSY"  # type: ignore[union-attr]
            finally:
                for stream in silent:
                    await close_stream(stream, reset=True)


async def test_a_trickled_payload_loses_its_place_at_the_minimum_rate(weights: ModelWeights) -> None:
    """An authentic request whose payload comes one byte a second: it is admitted (its header
    passed), but cut with TIMEOUT once it falls behind min_upload_rate after the header's grace,
    and its place is given back."""
    with trio.fail_after(60):
        async with running_provider(weights, slots=1, queue=0, header_timeout_s=2.0) as provider, \
                attacker(provider) as slow, attacker(provider) as honest:
            request, payload = make_request(weights)
            sealed = seal(request, signing_key(slow.key_pair))
            stream = await open_stream(slow, provider)
            try:
                opened = trio.current_time()
                await stream.write(frame_prefix(sealed, payload))

                async def trickle() -> None:
                    try:
                        for byte in payload:
                            await stream.write(bytes([byte]))
                            await trio.sleep(1)
                    except Exception:  # noqa: BLE001  # the provider reset the stream
                        pass

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(trickle)
                    with trio.fail_after(5):
                        while provider.provider.statistics().in_flight != 1:
                            await trio.sleep(0.01)
                    reply = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=20, frame_timeout_s=20)
                    cut_s = trio.current_time() - opened
                    nursery.cancel_scope.cancel()
                with pytest.raises(DeadlineExceeded):
                    verify_reply(reply, peer=provider.node.peer_id.to_bytes(), request=sealed)
                # 2 s of grace + len(payload) / 1 MB/s: cut within about 2 s of opening, not 60 s
                assert cut_s < 2 + len(payload) / 1e6 + 2
                assert provider.provider.statistics().in_flight == 0
            finally:
                await close_stream(stream, reset=True)
            assert await outcome(honest, provider, *make_request(weights)) == "ok"


def test_the_address_a_cap_counts_under() -> None:
    from cipherswarm.node.provider.admission import address_key

    assert address_key(("127.0.0.1", 4001), exempt_loopback=True) is None
    assert address_key(("127.0.0.1", 4001), exempt_loopback=False) == "127.0.0.1"
    assert address_key(("::ffff:10.1.2.3", 1), exempt_loopback=True) == "10.1.2.3"
    assert address_key(("2001:db8:1:2:3:4:5:6", 1), exempt_loopback=True) == "2001:db8:1:2::/64"
    assert address_key(("::1", 1), exempt_loopback=True) is None
    assert address_key(None, exempt_loopback=False) is None


# --- (g) the gate: peers refused again and again ---------------------------------------------------


async def test_a_peer_refused_again_and_again_is_turned_away_before_negotiation(weights: ModelWeights) -> None:
    """After `strikes` refusals in a row, a peer's streams beyond one a second (after a burst) are
    reset before protocol negotiation (before: each was negotiated, read and answered, and a flood
    of them left an honest call 4.6x slower, bench/provider_load.py). Another peer is served all
    along; once the struck peer's request is served, its strikes are cleared."""
    with trio.fail_after(60):
        async with running_provider(weights, strikes=3, struck_streams_per_s=1.0) as provider, \
                attacker(provider) as evil, attacker(provider) as honest:
            gate = provider.provider.gate
            for _ in range(3):
                assert await outcome(evil, provider, *make_request(weights, model_hash=b"\x07" * 32)) == "UNKNOWN_MODEL"
            assert gate.struck(evil.peer_id) and gate.turned_away == 0
            answered = turned = 0
            started = trio.current_time()
            for _ in range(12):
                try:
                    assert await outcome(evil, provider, *make_request(weights, model_hash=b"\x07" * 32)) == "UNKNOWN_MODEL"
                    answered += 1
                except StreamFailure:  # reset before negotiation
                    turned += 1
            tokens = gate.burst + (trio.current_time() - started) * gate.rate
            assert answered <= tokens and turned >= 12 - tokens and turned > 0
            assert gate.turned_away == provider.provider.rejections()["gate"] == turned
            assert await outcome(honest, provider, *make_request(weights)) == "ok"  # not struck
            await trio.sleep(1.0 / gate.rate)  # the next token
            assert await outcome(evil, provider, *make_request(weights)) == "ok"
            assert not gate.struck(evil.peer_id)
            for _ in range(6):  # more than a struck peer's burst: no longer limited
                assert await outcome(evil, provider, *make_request(weights)) == "ok"


def test_the_gate_limits_struck_peers_each_and_together_and_forgets_the_oldest() -> None:
    now = 0.0
    gate = StreamGate(strikes=2, rate=1.0, burst=2, shared_rate=2.0, max_peers=8, clock=lambda: now)
    a, b, c, d = (ID.from_pubkey(create_new_key_pair().public_key) for _ in range(4))
    gate.refused(a)
    assert all(gate.admits(a) for _ in range(10))  # one refusal: not struck
    gate.refused(a)
    assert [gate.admits(a) for _ in range(3)] == [True, True, False]  # struck: its burst, then nothing
    now = 1.0
    assert [gate.admits(a) for _ in range(2)] == [True, False]  # one token a second
    for peer in (b, c, d):
        gate.refused(peer)
        gate.refused(peer)
    now = 2.0  # the shared bucket is full again: 2 x 2 tokens, for 3 peers with 2 each
    assert [gate.admits(p) for p in (b, b, c, c, d, d)] == [True] * 4 + [False] * 2
    gate.served(b)
    assert not gate.struck(b) and gate.admits(b)
    small = StreamGate(strikes=1, max_peers=2, clock=lambda: now)
    for peer in (a, b, c):
        small.refused(peer)
    assert not small.struck(a) and small.struck(b) and small.struck(c)  # `a` forgotten first

