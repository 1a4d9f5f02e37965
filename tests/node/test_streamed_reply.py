"""Streamed replies (protocol 1.2) on real libp2p hosts on 127.0.0.1: a provider sends a
several-block result as it computes it, then the trailer; the bytes are those of the one-frame reply
it sends a 1.1 client, and fill the client's reply limit exactly; a client reading a streamed reply from a hostile provider that stalls, or
sends no trailer, gives up within its read deadline."""

from __future__ import annotations

import pytest
import torch
import trio
from libp2p.abc import INetStream
from libp2p.crypto.ed25519 import create_new_key_pair

from cipherswarm.fhe_backend import MatmulResult
from cipherswarm.node import ModelWeights, open_host
from cipherswarm.node.client.dispatch import reply_limits
from cipherswarm.node.discovery import now_ms
from cipherswarm.node.engine import BACKEND, ENGINE, encode_params
from cipherswarm.node.identity import signing_key
from cipherswarm.node.streams import close_stream, read_header, read_payload, request_reply, send_bytes
from cipherswarm.protocol import (
    GROUP_PROTOCOL_ID,
    PROTOCOL_IDS,
    STREAM_PROTOCOL_ID,
    DeadlineExceeded,
    MatmulReply,
    MatmulRequest,
    Range,
    Verified,
    WeightSlice,
    frame_head,
    seal,
    streamed_reply,
    verify_reply,
)

from node_factory import running_provider
from test_provider_attacks import LAYER, REPLY_LIMITS, attacker


def several_blocks(weights: ModelWeights) -> tuple[object, torch.Tensor, bytes, dict[str, object]]:
    """A key, its operand of two ring blocks and a short third, the ciphertext's bytes, and the
    request's fields for LAYER's first 64 columns."""
    layer = weights.resolve(LAYER)
    params = ENGINE.params_for(layer.weight.q, 8)  # type: ignore[union-attr]
    key = ENGINE.keygen(params)
    x = torch.randint(-128, 128, (2 * params.n + 5, 64))
    fields: dict[str, object] = dict(
        model_hash=weights.model_hash, layer=layer.name, weight_slice=WeightSlice(rows=Range(0, 64), cols=Range(0, 64)),
        transpose=False, backend=BACKEND, backend_params=encode_params(params), input_shape=tuple(x.shape),
        output_shape=(x.shape[0], 64), price_per_gmac=10,
    )
    return key, x, ENGINE.encrypt(key, x).to_bytes(), fields


async def test_a_several_block_result_is_streamed_on_1_2_and_sent_whole_on_1_1(weights: ModelWeights) -> None:
    key, x, payload, fields = several_blocks(weights)
    expected = x @ weights.resolve(LAYER).weight.q.long()[:, :64]  # type: ignore[union-attr]
    payloads = {}
    with trio.fail_after(60):
        async with running_provider(weights) as provider, attacker(provider) as client:
            for protocol in (STREAM_PROTOCOL_ID, GROUP_PROTOCOL_ID):
                request = MatmulRequest.for_payload(payload, expires_at_ms=now_ms() + 30_000, **fields)  # type: ignore[arg-type]
                sealed = seal(request, signing_key(client.key_pair))
                stream = await client.host.new_stream(provider.node.peer_id, [protocol])
                try:
                    frame = await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=20,
                                                frame_timeout_s=40)
                finally:
                    await close_stream(stream)
                head = frame.header.message
                assert isinstance(head, MatmulReply)
                assert head.streamed == (protocol == STREAM_PROTOCOL_ID) == (frame.trailer is not None)
                reply = verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed)
                assert reply.message.receipt is not None and reply.message.compute_time_us > 0
                result = MatmulResult.from_bytes(reply.payload)
                assert result.blocks == 3 and torch.equal(ENGINE.decrypt(key, result), expected)
                payloads[protocol] = reply.payload
            assert provider.provider.statistics().served == 2
    assert payloads[STREAM_PROTOCOL_ID] == payloads[GROUP_PROTOCOL_ID]
    # a client reads replies under a limit that an honest reply fills exactly: a provider declaring
    # one byte more is refused from the reply's header
    params = ENGINE.params_for(weights.resolve(LAYER).weight.q, 8)  # type: ignore[union-attr]
    assert reply_limits(params, x.shape[0], 64).max_payload_size == len(payloads[STREAM_PROTOCOL_ID])


HOSTILE_KEY = create_new_key_pair()


async def _hostile(stream: INetStream, *, payload_part: float) -> None:
    """A provider that reads the request, sends a streamed reply's header and `payload_part` of its
    payload, then stalls: no more bytes, no trailer."""
    try:
        head = await read_header(stream, limits=REPLY_LIMITS, timeout_s=5)
        await read_payload(stream, head, min_rate=1e5, grace_s=5)
        request = head.header.message
        assert isinstance(request, MatmulRequest)
        verified = Verified(request, b"", head.header.digest, b"")
        size = 4096
        reply = seal(streamed_reply(verified, size), signing_key(HOSTILE_KEY))
        await send_bytes(stream, frame_head(reply) + bytes(int(size * payload_part)), timeout_s=5)
        await trio.sleep(30)
    finally:
        await close_stream(stream, reset=True)


@pytest.mark.parametrize("payload_part", [0.5, 1.0])  # stalls inside the payload; sends it all but no trailer
async def test_a_client_gives_up_on_a_streamed_reply_that_stalls(weights: ModelWeights, payload_part: float) -> None:
    _, _, payload, fields = several_blocks(weights)
    with trio.fail_after(30):
        async with open_host(HOSTILE_KEY) as hostile, open_host(create_new_key_pair()) as client:

            async def handler(stream: INetStream) -> None:
                await _hostile(stream, payload_part=payload_part)

            hostile.host.set_stream_handler(STREAM_PROTOCOL_ID, handler)
            await client.connect(hostile.addrs()[0])
            request = MatmulRequest.for_payload(payload, expires_at_ms=now_ms() + 30_000, **fields)  # type: ignore[arg-type]
            sealed = seal(request, signing_key(client.key_pair))
            stream = await client.host.new_stream(hostile.peer_id, list(PROTOCOL_IDS))
            start = trio.current_time()
            try:
                with pytest.raises(DeadlineExceeded):
                    await request_reply(stream, sealed, payload, limits=REPLY_LIMITS, read_timeout_s=2, frame_timeout_s=20)
            finally:
                await close_stream(stream, reset=True)
            assert trio.current_time() - start < 6
