"""Slow, silent and overloaded providers: hedging, timeouts with bans, BUSY backpressure."""

from __future__ import annotations

from contextlib import AsyncExitStack

import torch
import trio

from cipherswarm.node import ModelWeights
from cipherswarm.node.client.uploads import Uploads

from node_factory import providers, random_operand, reference, running_provider, session

LAYER = "model.layers.0.mlp.gate_proj"  # 64 -> 128


async def test_slow_provider_is_hedged(weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with providers(weights, [{}, {}, dict(delay_s=20.0)]) as (fast, other, slow):
            # Column chunks: each one-block call reaches all three (by bytes it would go to one).
            async with session(weights, [fast.addr], min_providers=3, split="columns", hedge_min_s=0.3,
                               hedge_factor=1.0) as client:
                for _ in range(2):
                    x = random_operand(100, 64)
                    started = trio.current_time()
                    assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                    assert trio.current_time() - started < 5  # not the slow provider's 20 s
                stats = client.stats()
                assert stats.hedges >= 1
                assert slow.node.peer_id.to_base58() not in stats.chunks_by_peer
                # The straggler's measured latency now reflects it, so it ranks last.
                assert client.peers.get(slow.node.peer_id).latency_s > client.peers.get(fast.node.peer_id).latency_s


async def test_silent_provider_times_out_is_banned_and_the_call_completes_elsewhere(weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with providers(weights, [{}, dict(delay_s=30.0)]) as (good, silent):
            # No hedging here, so that the attempt has to time out. Column chunks: the call reaches
            # both providers (by bytes it would go to one).
            async with session(weights, [good.addr], min_providers=2, split="columns", hedge_min_s=60,
                               timeout_min_s=1.0, timeout_factor=1.0, ban_base_s=60) as client:
                x = random_operand(100, 64)
                assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                stats = client.stats()
                assert stats.timeouts == 1 and stats.retries == 1
                assert "1 time(s) in a row" in stats.bans[silent.node.peer_id.to_base58()]
                # Banned: the next call does not wait for it at all.
                started = trio.current_time()
                assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                assert trio.current_time() - started < 1.0
                assert client.stats().timeouts == 1


async def test_busy_backpressure_with_eight_clients(weights: ModelWeights) -> None:
    """One slot and one queue place: at most two requests are held in memory at once; the other
    clients get BUSY with a retry hint, come back, and all results are exact."""
    with trio.fail_after(120):
        async with running_provider(weights, slots=1, queue=1) as provider, AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(session(weights, [provider.addr])) for _ in range(8)]
            results: list[bool] = []

            async def call(client: object) -> None:
                x = random_operand(2048, 64)  # a whole ring block each: ~50 ms of provider work
                y = await client.matmul(LAYER, x)  # type: ignore[attr-defined]
                results.append(torch.equal(y, reference(weights, LAYER, x, transpose=False)))

            async with trio.open_nursery() as nursery:
                for client in clients:
                    nursery.start_soon(call, client)
            assert results == [True] * 8
            stats = provider.provider.statistics()
            assert stats.busy > 0 and stats.served == 8
            assert stats.peak_in_flight <= 2  # slots + queue: the provider's memory bound
            assert sum(c.stats().busy for c in clients) == stats.busy


class CountingUploads(Uploads):
    """The client's upload gate, recording how many uploads it had at once and when each was admitted."""

    def __init__(self, slots: int) -> None:
        super().__init__(slots, window_bytes=0)
        self.held = 0
        self.taken_at: list[float] = []

    async def take(self, nbytes: int) -> None:
        await super().take(nbytes)
        self.held += 1
        self.taken_at.append(trio.current_time())

    def release(self, nbytes: int, seconds: float = 0.0) -> None:
        self.held -= 1
        super().release(nbytes, seconds)


async def test_the_upload_slot_is_held_while_writing_not_while_computing(weights: ModelWeights) -> None:
    """One upload slot, two providers that each take 4 s to answer: the second request is written
    as soon as the first is, so the call takes one provider's time, not two."""
    with trio.fail_after(60):
        async with providers(weights, [dict(delay_s=4.0), dict(delay_s=4.0)]) as (first, _):
            async with session(weights, [first.addr], min_providers=2, upload_slots=1, split="blocks",
                               hedge_min_s=60) as client:
                client.dispatcher._uploads = uploads = CountingUploads(1)
                x = random_operand(2 * 2048, 64)  # two ring blocks: one chunk per provider
                started = trio.current_time()
                assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                assert trio.current_time() - started < 7.0  # two turns of 4 s each would take 8 s
                assert len(uploads.taken_at) == 2 and uploads.taken_at[1] - uploads.taken_at[0] < 3.0
                assert uploads.held == 0


async def test_a_silent_provider_gives_its_upload_slot_back(weights: ModelWeights) -> None:
    """Every attempt, the one that times out included, takes the slot and returns it."""
    with trio.fail_after(60):
        async with providers(weights, [{}, {}, dict(delay_s=30.0)]) as (first, _, silent):
            async with session(weights, [first.addr], min_providers=3, upload_slots=1, split="blocks",
                               hedge_min_s=60, timeout_min_s=2.0, timeout_factor=1.0) as client:
                client.dispatcher._uploads = uploads = CountingUploads(1)
                x = random_operand(3 * 2048, 64)  # three ring blocks: one chunk per provider
                assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                stats = client.stats()
                assert stats.timeouts == 1 and silent.node.peer_id.to_base58() in stats.bans
                assert len(uploads.taken_at) == stats.chunks + stats.timeouts and uploads.held == 0
