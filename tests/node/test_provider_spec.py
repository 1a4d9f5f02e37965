"""The provider and protocol/README.md kept in step, on real libp2p hosts on 127.0.0.1: the
advert lists every stream protocol it serves (the advert protocol too), `mask_seeds` is refused
for an engine whose payload carries its seeds, a refusal decided on a decoded request header names
the request (a payload over the limit too), and a nonce is used up by a request refused after the
replay check, as the REPLAY row of the error table says."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import trio

from cipherswarm.node import ModelWeights
from cipherswarm.node.identity import signing_key
from cipherswarm.node.streams import read_frame
from cipherswarm.protocol import (
    ADVERT_PROTOCOL_ID,
    PROTOCOL_IDS,
    BadSignature,
    MalformedFrame,
    MatmulReply,
    ReplayedFrame,
    seal,
    verify_reply,
)
from cipherswarm.protocol.varint import encode_uvarint

from node_factory import running_provider
from test_provider_attacks import REPLY_LIMITS, ask, attacker, make_request, open_stream
from test_provider_limits import advert_of

README = (Path(__file__).resolve().parents[2] / "protocol" / "README.md").read_text()


def _row(table_key: str, *, containing: str = "") -> str:
    """The README table row that starts with `table_key` (and holds `containing`)."""
    rows = [line for line in README.splitlines()
            if re.match(rf"\| {re.escape(table_key)} \|", line) and containing in line]
    assert len(rows) == 1, table_key
    return rows[0]


async def test_the_advert_lists_the_advert_protocol_as_the_spec_says(weights: ModelWeights) -> None:
    assert ADVERT_PROTOCOL_ID in _row("1 | `protocols`")
    with trio.fail_after(30):
        async with running_provider(weights) as provider, attacker(provider) as client:
            advert = await advert_of(client, provider.node.peer_id)
    assert advert.protocols == (*PROTOCOL_IDS, ADVERT_PROTOCOL_ID)
    registered = set(provider.node.host.get_mux().handlers)
    assert set(advert.protocols) <= {str(p) for p in registered}


async def test_mask_seeds_are_refused_from_the_header_and_use_no_nonce(weights: ModelWeights) -> None:
    assert "a provider refuses any, `BAD_FRAME`" in _row("10 | `mask_seeds`")
    with trio.fail_after(30):
        async with running_provider(weights) as provider, attacker(provider) as client:
            request, payload = make_request(weights, mask_seeds=(b"\x05" * 32,))
            with pytest.raises(MalformedFrame) as caught:
                await ask(client, provider, request, payload)
            assert caught.value.remote
            assert len(provider.provider.window) == 0
            assert provider.provider.statistics().served == 0


async def test_a_payload_over_the_limit_is_refused_naming_the_request(weights: ModelWeights) -> None:
    """The header declares a payload over max_payload_size: TOO_LARGE, sent after the header
    (nothing more is written), and the reply names the request (before: an empty request_id)."""
    assert "a `payload_length` over the limit included" in _row("1 | `request_id`", containing="the request's")
    with trio.fail_after(30):
        async with running_provider(weights, max_payload_size=1024) as provider, attacker(provider) as client:
            request, _ = make_request(weights)
            request = dataclasses.replace(request, payload_length=1 << 20)
            sealed = seal(request, signing_key(client.key_pair))
            stream = await open_stream(client, provider)
            try:
                await stream.write(encode_uvarint(len(sealed.header)) + sealed.header)
                frame = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=5, frame_timeout_s=5)
            finally:
                await stream.reset()
    reply = frame.header.message
    assert isinstance(reply, MatmulReply) and reply.error is not None and reply.error.limit == 1024
    assert (reply.request_id, reply.request_digest) == (request.request_id, sealed.digest)
    with pytest.raises(Exception) as caught:
        verify_reply(frame, peer=provider.node.peer_id.to_bytes(), request=sealed)
    assert getattr(caught.value, "remote", False)


async def test_a_nonce_is_used_up_by_a_request_refused_after_the_replay_check(weights: ModelWeights) -> None:
    """The REPLAY row says what section 8 step 5 does: a nonce is used once its request passed steps
    1 to 4, even if it was not served (here: a payload that is not the one signed)."""
    assert "whether or not it was then served" in _row("`REPLAY` | 4")
    with trio.fail_after(30):
        async with running_provider(weights) as provider, attacker(provider) as client:
            request, payload = make_request(weights)
            with pytest.raises(BadSignature):
                await ask(client, provider, request, payload, sent=bytes(len(payload)))
            with pytest.raises(ReplayedFrame) as caught:
                await ask(client, provider, request, payload)
            assert caught.value.remote
