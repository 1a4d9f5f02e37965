"""The shared-mask profile on the wire: a client binds its keys to the layers it reads from its own
checkpoint, every split decrypts exactly, a short call pays only for its tokens, and a cheater is
still caught and its chunks redone under fresh, freshly bound keys."""

from __future__ import annotations

import pytest
import torch
import trio

from cipherswarm.node import Cheat, Ledger, ModelWeights

from node_factory import providers, random_operand, reference, session

LAYER = "model.layers.0.mlp.up_proj"


@pytest.mark.parametrize("split", ["blocks", "columns", "rows"])
async def test_every_split_is_exact(weights: ModelWeights, split: str) -> None:
    """Two providers share each call, forward and transposed: token blocks, column slices (each
    decrypted under its columns of Z) or contraction rows (each under its rows' own binding)."""
    with trio.fail_after(120), Ledger() as ledger:
        async with providers(weights, [dict(), dict()]) as (a, b):
            async with session(weights, [a.addr, b.addr], ledger=ledger, min_providers=2, split=split,
                               profile="shared-mask") as client:
                for transpose in (False, True):
                    channel = client.keys.channel(client.weights.resolve(LAYER), transpose=transpose)
                    assert channel.shared_mask
                    x = random_operand(channel.params.n + 5, channel.key.contraction)
                    y = await client.matmul(LAYER, x, transpose=transpose)
                    assert torch.equal(y, reference(weights, LAYER, x, transpose=transpose))
                assert a.provider.statistics().served >= 1 and b.provider.statistics().served >= 1


async def test_a_short_call_pays_only_for_its_tokens(weights: ModelWeights) -> None:
    """The reply of a block carries B'' alone: 256 tokens cost the same bytes per token each way as
    a full block, where the default profile's reply carries the mask product for all N slots."""
    per_token: dict[str, list[float]] = {}
    with trio.fail_after(120), Ledger() as ledger:
        async with providers(weights, [dict()]) as (a,):
            for profile in ("shared-mask", "default"):
                async with session(weights, [a.addr], ledger=ledger, profile=profile) as client:
                    n = client.keys.channel(client.weights.resolve(LAYER), transpose=False).params.n
                    for tokens in (n, 256):
                        before = client.stats().bytes_received
                        await client.matmul(LAYER, random_operand(tokens, 64))
                        per_token.setdefault(profile, []).append((client.stats().bytes_received - before) / tokens)
    full, short = per_token["shared-mask"]
    assert short <= 1.05 * full  # headers and seeds aside, the same per token
    full_default, short_default = per_token["default"]
    assert short_default > 3 * full_default and full < 0.6 * full_default


async def test_a_cheater_is_caught_and_the_keys_are_bound_again(weights: ModelWeights) -> None:
    with trio.fail_after(120), Ledger() as ledger:
        async with providers(weights, [dict(slots=1), dict(slots=1, cheat=Cheat.RANDOM)]) as (honest, cheater):
            async with session(weights, [honest.addr, cheater.addr], ledger=ledger, min_providers=2, split="blocks",
                               profile="shared-mask") as client:
                channel = client.keys.channel(client.weights.resolve(LAYER), transpose=False)
                first = channel.key
                x = random_operand(2 * channel.params.n, 64)
                y = await client.matmul(LAYER, x)
                assert torch.equal(y, reference(weights, LAYER, x, transpose=False))
                assert cheater.node.peer_id.to_base58() in client.stats().bans
                assert channel.key is not first and channel.key.bound()


async def test_a_client_without_room_binds_for_each_call_and_drops_it(weights: ModelWeights) -> None:
    """With no budget for bindings, every call binds its key from the checkpoint and the binding
    goes with the call's last user: two calls of one layer at once are both exact, and afterwards
    the key holds its seed alone."""
    with trio.fail_after(120), Ledger() as ledger:
        async with providers(weights, [dict(), dict()]) as (a, b):
            async with session(weights, [a.addr, b.addr], ledger=ledger, min_providers=2, split="rows",
                               profile="shared-mask", binding_budget=0) as client:
                channel = client.keys.channel(client.weights.resolve(LAYER), transpose=False)
                xs = [random_operand(300, 64), random_operand(channel.params.n + 1, 64)]
                ys: list[torch.Tensor] = [torch.empty(0)] * 2

                async def call(i: int) -> None:
                    ys[i] = await client.matmul(LAYER, xs[i])

                async with trio.open_nursery() as nursery:
                    for i in range(2):
                        nursery.start_soon(call, i)
                for x, y in zip(xs, ys):
                    assert torch.equal(y, reference(weights, LAYER, x, transpose=False))
                assert not channel.key.bound() and channel.key.nbytes == 32 and client.keys.state_bytes() < 1 << 20


async def test_compact_shared_mask_chunks_stay_within_the_bound_and_a_cheater_is_caught(weights: ModelWeights) -> None:
    """Both flags on real hosts: a two-block call split over an honest provider and one multiplying
    by other weights is within the profile's bound, and the cheater is caught and its chunk redone."""
    with trio.fail_after(120), Ledger() as ledger:
        async with providers(weights, [dict(slots=1), dict(slots=1, cheat=Cheat.WRONG_WEIGHTS)]) as (honest, cheater):
            async with session(weights, [honest.addr, cheater.addr], ledger=ledger, min_providers=2, split="blocks",
                               profile="compact-shared-mask") as client:
                channel = client.keys.channel(client.weights.resolve(LAYER), transpose=False)
                x = random_operand(2 * channel.params.n, 64, bits=14)
                y = await client.matmul(LAYER, x)
                assert (y - reference(weights, LAYER, x, transpose=False)).abs().max() <= channel.params.decoded_error
                assert cheater.provider.statistics().served >= 1
                assert cheater.node.peer_id.to_base58() in client.stats().bans
