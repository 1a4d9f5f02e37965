"""The router plans within what providers advertise one request may ask (protocol README, section 8):
no chunk's reply above the smallest `max_reply_size` or output above the smallest
`max_output_elements` among the providers it may go to, none contracting over fewer features than
the largest `min_contraction` (unless the layer has fewer), and providers that would refuse the
client's request lifetime are not holders. A real provider with tight limits serves a whole call
without refusing one chunk."""

from __future__ import annotations


import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from cipherswarm.fhe_backend.ciphertext import result_size
from cipherswarm.fhe_backend.evaluator import output_elements
from cipherswarm.node import ClientConfig, Ledger, ModelWeights, ProviderAdvert
from cipherswarm.node.client.peers import Need, PeerTable
from cipherswarm.node.client.router import CallShape, ChunkLimits, ChunkRouter
from cipherswarm.node.discovery import now_ms
from cipherswarm.node.engine import ENGINE

from node_factory import random_operand, reference, running_provider, session

MODEL = b"m" * 32
LAYER = b"l" * 32


def advert(**limits: int) -> ProviderAdvert:
    issued = now_ms()
    return ProviderAdvert(
        peer=ID.from_pubkey(create_new_key_pair().public_key), addrs=(), models=frozenset({MODEL}), layers=None,
        backends=("rlwe",), protocols=("/cipherswarm/matmul/1.1.0",), device="cpu", macs_per_second=10**9,
        price_per_gmac=0, free_slots=2, max_payload_size=limits.pop("max_payload_size", 1 << 30),
        issued_at_ms=issued, expires_at_ms=issued + 60_000, **limits,
    )


def test_limits_are_the_strictest_stated_among_the_adverts() -> None:
    adverts = [advert(max_reply_size=5000, max_output_elements=0, min_contraction=64),
               advert(max_reply_size=9000, max_output_elements=70_000, min_contraction=256, max_payload_size=4000),
               advert()]  # an older provider, stating nothing
    assert ChunkLimits.of(adverts, max_payload=10**9) == ChunkLimits(4000, 5000, 70_000, 256)
    assert ChunkLimits.of([advert()], max_payload=123) == ChunkLimits(123, None, None, 1)


SHAPES = [  # (tokens, n, contraction, output, in_bytes, out_bytes): small and LLaMA-8B-like layers
    (100, 2048, 16, 12, 1, 1),
    (16 * 2048, 2048, 4096, 14336, 5, 6),
    (3 * 2048 + 5, 2048, 14336, 4096, 5, 6),
    (70_000, 4096, 2048, 8192, 7, 10),
]
LIMITS = [  # (max_payload, max_reply, max_output, min_contraction)
    (1 << 30, None, None, 1),
    (512 << 20, 256 << 20, 1 << 25, 1024),
    (64 << 20, 48 << 20, 1 << 22, 4096),  # one block of one 1024-column grid cell fits: 42 MB at n = 4096
    (8 << 20, 200 << 20, 1 << 24, 512),  # payload-bound: row parts, each a full-width reply
]


@pytest.mark.parametrize(("split", "providers"), [("auto", 1), ("auto", 3), ("blocks", 4), ("columns", 5), ("rows", 8)])
@pytest.mark.parametrize("limits", LIMITS)
@pytest.mark.parametrize("dims", SHAPES)
def test_no_chunk_exceeds_the_advertised_limits(dims: tuple[int, ...], limits: tuple, split: str, providers: int) -> None:
    """Every plan covers the product exactly once and each chunk stays within every limit, the reply
    counted as the provider counts it (real parameters' sizes are below the router's bound)."""
    shape = CallShape(*dims)
    max_payload, max_reply, max_output, min_contraction = limits
    router = ChunkRouter(PeerTable(ledger=Ledger()), ClientConfig(split=split))  # type: ignore[arg-type]
    chunks = router.plan(shape, providers=providers, max_payload=max_payload, max_reply=max_reply,
                         max_output=max_output, min_contraction=min_contraction)
    cells = sum(len(c.blocks) * len(c.contraction) * len(c.output) for c in chunks)
    assert cells == shape.blocks * shape.contraction * shape.output  # each cell once (chunks are disjoint boxes)
    assert len({(c.blocks, c.contraction, c.output) for c in chunks}) == len(chunks)
    floor = min(min_contraction, shape.contraction)
    for c in chunks:
        assert len(c.contraction) >= floor
        if max_output is not None:
            assert len(c.blocks) * shape.n * len(c.output) <= max_output
        if max_reply is not None:
            assert ChunkLimits.reply_bound(shape, len(c.blocks), len(c.output), c.row_parts) <= max_reply


def test_the_reply_bound_covers_the_provider_count() -> None:
    """The router's bound on a reply is at least the size a provider computes from the header (and
    `output_elements` the evaluator's allocation), for real parameters of both profiles."""
    for profile in ("default", "shared-mask"):
        w = torch.randint(-127, 128, (256, 96), dtype=torch.int8)
        params = ENGINE.params_for(w, 8, profile=profile)
        for tokens in (1, params.n, 2 * params.n + 7):
            shape = CallShape(tokens, params.n, 256, 96, params.in_bytes, params.out_bytes, params.pad_bytes)
            assert result_size(params, tokens, 96) <= ChunkLimits.reply_bound(shape, shape.blocks, 96, 1)
            key = ENGINE.keygen(params, weights=w)
            out = ENGINE.matmul(ENGINE.encrypt(key, torch.randint(-128, 128, (tokens, 256))), w)
            assert len(out.to_bytes()) == result_size(params, tokens, 96)
            assert out.b_words.size == output_elements(params, tokens, 96)
            if tokens > 1:
                break  # one multi-block product per profile is enough on two cores


def test_a_provider_that_would_refuse_the_request_lifetime_is_no_holder() -> None:
    table = PeerTable(ledger=Ledger(), request_ttl_s=60.0)
    short, default, long = advert(max_ttl_ms=30_000), advert(), advert(max_ttl_ms=120_000)
    for a in (short, default, long):
        table.update(a)
    need = Need(MODEL, (LAYER,), payload=10, macs=10)
    assert {s.peer for s in table.holders(need)} == {default.peer, long.peer}


DOWN = "model.layers.0.mlp.down_proj"  # 128 -> 64


async def test_a_provider_with_tight_limits_serves_a_whole_call_without_a_refusal(weights: ModelWeights) -> None:
    """A provider advertising a reply limit below one call's reply (and a contraction floor of the
    whole layer): the client plans one chunk per block, each within the limit, and the provider
    refuses none of them; the product is exact."""
    with trio.fail_after(120):
        n = ENGINE.params_for(weights.plain(weights.resolve(DOWN).name), 8).n
        tokens = 2 * n + 3
        limit = 900_000  # one block's reply fits (n x 64 x 6 B + header); the call's three do not
        async with running_provider(weights, max_reply_size=limit, min_contraction=128) as provider:
            async with session(weights, [provider.addr]) as client:
                x = random_operand(tokens, 128)
                assert torch.equal(await client.matmul(DOWN, x), reference(weights, DOWN, x, transpose=False))
                assert client.stats().chunks >= 3
            stats = provider.provider.statistics()
            assert (stats.errors, stats.served) == (0, client.stats().chunks)
