"""What one request may ask of a provider (protocol README, section 8; node/provider/service.py), on
real libp2p hosts on 127.0.0.1: the advert states its limits, and a request whose header asks for
more (a reply or an output over the advertised bound, a contraction thinner than the advertised
minimum, a payload length the shape does not give) is refused from its header alone, with a typed
error, before its payload is read, a place taken, a nonce used up or anything allocated. Then a
provider process: the largest amplifying request the protocol allows is refused, one at its limits
is served, and its resident memory grows by less than the bound those limits imply."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from cipherswarm.fhe_backend.ciphertext import ciphertext_size, result_size
from cipherswarm.fhe_backend.evaluator import output_elements
from cipherswarm.node import ModelWeights, NodeHost, Provider, ProviderAdvert, ProviderConfig, load_model, open_host
from cipherswarm.node.discovery import read_advert
from cipherswarm.node.engine import ENGINE, decode_params
from cipherswarm.node.identity import signing_key
from cipherswarm.node.streams import read_frame
from cipherswarm.protocol import (
    ADVERT_PROTOCOL_ID,
    PROTOCOL_IDS,
    ContractionTooThin,
    FrameTooLarge,
    MatmulRequest,
    ProtocolError,
    Range,
    ReplyTooLarge,
    ShapeMismatch,
    WeightSlice,
    seal,
    verify_reply,
)
from cipherswarm.protocol.messages import MAX_DIM
from cipherswarm.protocol.shapes import check_shapes
from cipherswarm.protocol.varint import encode_uvarint

from node_factory import provider_process, running_provider
from test_provider_attacks import REPLY_LIMITS, attacker, ask, make_request

UP = "model.layers.0.mlp.up_proj"  # 64 -> 128
WIDTH = 128


def asking(weights: ModelWeights, *, rows: Range, tokens: int, payload_length: int | None = None) -> MatmulRequest:
    """A signed-to-be request for W[rows, :] of UP with `tokens` tokens, its payload never sent: the
    header alone must be answered. Its payload length is the ciphertext's unless given."""
    request, _ = make_request(weights)
    params = decode_params(request.backend_params)
    return dataclasses.replace(
        request, layer=weights.resolve(UP).name, weight_slice=WeightSlice(rows=rows, cols=Range(0, WIDTH)),
        input_shape=(tokens, len(rows)), output_shape=(tokens, WIDTH), payload_sha256=b"\x01" * 32,
        payload_length=ciphertext_size(params, tokens, len(rows)) if payload_length is None else payload_length,
    )


async def refusal(node: NodeHost, peer: ID, request: MatmulRequest) -> ProtocolError:
    """Send `request`'s header alone and return the provider's refusal (checked as a client does),
    which must come within 3 s: it is decided without a byte of the payload."""
    sealed = seal(request, signing_key(node.key_pair))
    stream = await node.host.new_stream(peer, list(PROTOCOL_IDS))
    try:
        started = trio.current_time()
        await stream.write(encode_uvarint(len(sealed.header)) + sealed.header)
        with trio.fail_after(5):
            reply = await read_frame(stream, limits=REPLY_LIMITS, read_timeout_s=5, frame_timeout_s=5)
        assert trio.current_time() - started < 3
        with pytest.raises(ProtocolError) as caught:
            verify_reply(reply, peer=peer.to_bytes(), request=sealed)
    finally:
        await stream.reset()
    assert caught.value.remote
    return caught.value


async def advert_of(node: NodeHost, peer: ID) -> ProviderAdvert:
    """The provider's advert, as its advert protocol hands it out."""
    stream = await node.host.new_stream(peer, [ADVERT_PROTOCOL_ID])
    data = b""
    try:
        while chunk := await stream.read(1 << 16):
            data += chunk
    except Exception:  # noqa: BLE001  # libp2p ends a stream with StreamEOF
        pass
    return read_advert(data)


async def test_the_advert_states_what_one_request_may_ask(weights: ModelWeights) -> None:
    with trio.fail_after(30):
        async with running_provider(weights, max_reply_size=3 << 20, max_output_elements=1 << 20, min_contraction=32,
                                    max_ttl_ms=90_000) as provider, attacker(provider) as client:
            advert = await advert_of(client, provider.node.peer_id)
            got = (advert.max_reply_size, advert.max_output_elements, advert.min_contraction, advert.max_ttl_ms)
            assert got == (3 << 20, 1 << 20, 32, 90_000)
            assert advert.accepts_ttl(90_000) and not advert.accepts_ttl(90_001)


# (case, provider config, rows, tokens, payload length, error, limit reported on the wire)
CASES = [
    # one contraction row of up_proj at the most tokens the protocol allows: 10 MB of payload asking
    # for a 1.6 GB reply (4 GiB of int64 words while computed), refused as a thin slice
    ("thin slice", {}, Range(0, 1), MAX_DIM, None, ContractionTooThin, None),
    # the whole contraction: its output is over the advertised elements
    ("output", {}, Range(0, 64), 1 << 20, None, ReplyTooLarge, 1 << 25),
    # an output within the elements, its reply over the advertised bytes
    ("reply", {"max_reply_size": 1 << 20}, Range(0, 64), 4096, None, ReplyTooLarge, 1 << 20),
    # a payload length that is not the ciphertext the shape needs
    ("payload length", {}, Range(0, 64), 4096, 4096 * 64, ShapeMismatch, None),
]


@pytest.mark.parametrize(("case", "config", "rows", "tokens", "payload_length", "error", "limit"), CASES,
                         ids=[c[0] for c in CASES])
async def test_a_request_asking_too_much_is_refused_from_its_header(
    weights: ModelWeights, case: str, config: dict, rows: Range, tokens: int, payload_length: int | None,
    error: type[ProtocolError], limit: int | None,
) -> None:
    """Only the header is sent: the typed refusal arrives at once (the provider reads no payload to
    decide), and nothing was admitted, used up or computed. An honest request is served after."""
    with trio.fail_after(60):
        async with running_provider(weights, **config) as provider, attacker(provider) as evil:
            request = asking(weights, rows=rows, tokens=tokens, payload_length=payload_length)
            wire = await refusal(evil, provider.node.peer_id, request)
            assert wire.code == error.code, wire
            if limit is not None:
                assert isinstance(wire, FrameTooLarge) and wire.limit == limit
            stats = provider.provider.statistics()
            assert (stats.errors, stats.served, stats.peak_in_flight) == (1, 0, 0)
            assert len(provider.provider.window) == 0  # refused before its nonce was recorded
            await ask(evil, provider, *make_request(weights))


def test_the_provider_raises_the_typed_errors_locally(weights: ModelWeights) -> None:
    """The same checks, called directly: each case's own exception class (the wire carries its code)."""
    for case, config, rows, tokens, payload_length, error, _ in CASES:
        provider = Provider(weights=weights, key_pair=create_new_key_pair(), config=ProviderConfig(**config))
        request = asking(weights, rows=rows, tokens=tokens, payload_length=payload_length)
        layer = provider.weights.lookup(request.model_hash, request.layers)
        assert layer is not None
        with pytest.raises(error) as caught:
            check_shapes(request, layer, min_contraction=provider.config.min_contraction)
            provider._check_request(request)
        assert type(caught.value) is error, case


def vm(pid: int, field: str) -> int:
    """A /proc/<pid>/status field, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
async def test_a_provider_process_stays_within_the_bound_it_advertises(model_dir: Path, tmp_path: Path) -> None:
    """A `cipherswarm provider` process with small advertised limits. The amplification request at
    the protocol's largest size is refused and its resident memory does not move; a request at its
    limits is served, and its high-water mark rises by less than what those limits imply: 16 bytes
    per output element computed, the reply twice (serialized, then as bytes), the request's payload
    three times (read, parsed, hashed), plus 32 MiB for one product's tiles and the interpreter.
    Before the limits, the first request alone asked for 4 GiB of int64 words."""
    max_output, max_reply = 1 << 20, 9 << 20  # 8 B per value at these parameters, and the header
    weights = load_model(model_dir)
    with trio.fail_after(12):  # 4-5 s measured on 2 busy cores
        async with provider_process(model_dir, tmp_path, "--max-output-elements", str(max_output),
                                    "--max-reply-size", str(max_reply)) as proc, \
                open_host(create_new_key_pair()) as client:
            pid, peer = proc.proc.pid, ID.from_base58(proc.peer_id)
            await client.connect(proc.multiaddr)
            advert = await advert_of(client, peer)
            assert (advert.max_output_elements, advert.max_reply_size) == (max_output, max_reply)
            remote = SimpleNamespace(node=SimpleNamespace(peer_id=peer))  # what ask() needs of a provider

            settled = vm(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # the high-water mark restarts from now
            thin = await refusal(client, peer, asking(weights, rows=Range(0, 1), tokens=MAX_DIM))
            assert isinstance(thin, ShapeMismatch)
            assert vm(pid, "VmHWM") - settled < 16 << 20

            tokens = max_output // WIDTH  # the largest output the advert allows
            template, _ = make_request(weights)
            params = decode_params(template.backend_params)
            assert output_elements(params, tokens, WIDTH) <= max_output
            assert result_size(params, tokens, WIDTH) <= max_reply
            payload = ENGINE.encrypt(ENGINE.keygen(params), torch.randint(-128, 128, (tokens, 64))).to_bytes()
            request = MatmulRequest.for_payload(
                payload, expires_at_ms=template.expires_at_ms, model_hash=template.model_hash,
                layer=weights.resolve(UP).name, weight_slice=WeightSlice(rows=Range(0, 64), cols=Range(0, WIDTH)),
                transpose=False, backend=template.backend, backend_params=template.backend_params,
                input_shape=(tokens, 64), output_shape=(tokens, WIDTH), price_per_gmac=template.price_per_gmac)
            settled = vm(pid, "VmRSS")
            Path(f"/proc/{pid}/clear_refs").write_text("5")
            await ask(client, remote, request, payload)  # type: ignore[arg-type]
            growth = vm(pid, "VmHWM") - settled
            bound = 16 * max_output + 2 * max_reply + 3 * len(payload) + (32 << 20)
            assert 0 < growth < bound, (growth, bound)
