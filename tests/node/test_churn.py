"""A provider that disappears mid-training and comes back: banned with a doubling backoff while
gone, the calls completing on the others meanwhile, given work again once its ban is over."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import torch
import trio
from libp2p.peer.id import ID

from cipherswarm.node import Ledger, ModelWeights
from cipherswarm.node.client import SwarmSession
from cipherswarm.protocol.messages import UsageReceipt

from node_factory import provider_process, random_operand, reference, session

LAYER = "model.layers.0.mlp.gate_proj"  # 64 -> 128: cut into column chunks, one per provider
BAN_BASE_S = 1.0


async def _keep_calling(client: SwarmSession, weights: ModelWeights, completed: list[float]) -> None:
    """Exact calls, one after another, as a training loop makes them; the time of each completion."""
    while True:
        x = random_operand(100, 64)
        assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
        completed.append(trio.current_time())


async def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    """Poll ``condition`` until it holds; an AssertionError naming ``what`` after ``timeout_s``."""
    with trio.move_on_after(timeout_s):
        while not condition():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"not within {timeout_s} s: {what}")


def _receipts_of(ledger: Ledger, peer: ID, since_ms: int) -> int:
    """Accepted chunks the ledger holds from ``peer``, completed at ``since_ms`` or later."""
    receipts = (UsageReceipt.from_bytes(r.receipt_bytes) for r in ledger.receipts())
    return sum(r.provider == peer and r.completed_at_ms >= since_ms for r in receipts)


async def test_stopped_provider_is_banned_with_backoff_and_served_again_after_it_returns(
    weights: ModelWeights, model_dir: Path, tmp_path: Path
) -> None:
    with trio.fail_after(110), Ledger() as ledger:
        async with (
            provider_process(model_dir, tmp_path) as steady,
            # Adverts live three intervals: the victim's must outlive its absence, or it would not be retried.
            provider_process(model_dir, tmp_path, "--advert-interval", "5", bootstrap=[steady.multiaddr]) as victim,
            # No hedging, short timeouts: an attempt on the stopped provider must time out. Column
            # chunks: a one-block call then goes to both providers (by bytes it would go to one).
            session(weights, [steady.multiaddr], ledger=ledger, min_providers=2, split="columns", hedge_min_s=60, timeout_min_s=1.0,
                    timeout_factor=1.0, ban_base_s=BAN_BASE_S, ban_max_s=4 * BAN_BASE_S) as client,
            trio.open_nursery() as nursery,
        ):
            victim_id = ID.from_base58(victim.peer_id)
            state = client.peers.get  # the live record of a provider, by peer id
            completed: list[float] = []
            nursery.start_soon(_keep_calling, client, weights, completed)
            await _wait(lambda: state(victim_id).chunks >= 2, 30, "both providers serve")

            os.kill(victim.proc.pid, signal.SIGSTOP)
            try:
                stopped_at = trio.current_time()
                # Timed out, banned 1 s, tried again, timed out, banned 2 s: calls go on meanwhile.
                await _wait(lambda: state(victim_id).timeouts_in_row >= 2, 30, "two timeouts in a row")
                served_while_gone = sum(t > stopped_at for t in completed)
                ban_left = state(victim_id).banned_until - trio.current_time()
                assert "timed out 2 time(s) in a row" in client.stats().bans[victim_id.to_base58()]
                chunks_before = state(victim_id).chunks
            finally:
                os.kill(victim.proc.pid, signal.SIGCONT)
            back_ms = int(time.time() * 1000)
            assert served_while_gone >= 2
            assert BAN_BASE_S < ban_left <= 2 * BAN_BASE_S  # the backoff doubled

            # Back: once the ban is over it gets chunks again, and a success resets its backoff.
            await _wait(lambda: state(victim_id).chunks > chunks_before, 40, "the returning provider serves again")
            assert state(victim_id).timeouts_in_row == 0
            assert victim_id.to_base58() not in client.stats().bans
            assert _receipts_of(ledger, victim_id, since_ms=back_ms) >= 1
            calls_after = len(completed)
            await _wait(lambda: len(completed) >= calls_after + 2, 20, "calls go on with both providers")
            nursery.cancel_scope.cancel()
