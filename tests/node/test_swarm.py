"""Three providers on loopback: discovery, a layer split across them, exact results, receipts."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import trio

from cipherswarm.node import Ledger, ModelWeights, SwarmClient
from cipherswarm.node.discovery import now_ms
from cipherswarm.protocol import verify_receipt
from cipherswarm.protocol.signing import peer_key

from node_factory import client_config, providers, random_operand, reference, running_provider, session

LAYER = "model.layers.0.mlp.up_proj"  # 64 -> 128: both directions have a different contraction
#: row parts of these tiny layers contract over a few dozen features, far below a provider's default
#: floor (ProviderConfig.min_contraction, which refuses thin slices that only amplify)
THIN_ROWS = {"min_contraction": 16}


async def test_discovers_three_providers_through_one(weights: ModelWeights) -> None:
    with trio.fail_after(60):
        async with providers(weights, [{}, {}, {}]) as running:
            start = trio.current_time()
            async with session(weights, [running[0].addr], min_providers=3) as client:
                took = trio.current_time() - start
                assert {s.peer for s in (client.peers.get(r.node.peer_id) for r in running)} == {r.node.peer_id for r in running}
                views = {v.peer: v for v in client.stats().peers}
                for r in running:
                    view = views[r.node.peer_id.to_base58()]
                    assert view.macs_per_second == r.provider.macs_per_second > 0
                    assert view.device == "cpu" and view.layers is None
            assert took < 10, f"discovery took {took:.1f} s"


@pytest.mark.parametrize(
    ("split", "tokens", "transpose"),
    [
        ("columns", 100, False),  # fewer blocks than providers: output columns (auto sends it whole: TestPlanByBytes)
        ("columns", 100, True),
        ("blocks", 4500, False),  # three ring blocks of 2048 tokens
        ("rows", 300, False),  # contraction rows, added up by the client
        ("rows", 300, True),
    ],
)
async def test_layer_split_across_three_is_exact(weights: ModelWeights, split: str, tokens: int, transpose: bool) -> None:
    with trio.fail_after(90):
        async with providers(weights, [THIN_ROWS] * 3) as running:
            async with session(weights, [r.addr for r in running], min_providers=3, split=split) as client:
                layer = weights.resolve(LAYER)
                x = random_operand(tokens, layer.shape.d_out if transpose else layer.shape.d_in)
                y = await client.matmul(LAYER, x, transpose=transpose)
                assert y.dtype == torch.int64
                assert torch.equal(y, reference(weights, LAYER, x, transpose=transpose))
                stats = client.stats()
                assert stats.chunks == 3 and set(stats.chunks_by_peer.values()) == {1}
                assert stats.verification_failures == stats.retries == 0


@pytest.mark.parametrize(("split", "tokens", "transpose"), [("columns", 100, False), ("rows", 300, True), ("blocks", 4500, False)])
async def test_compact_profile_over_the_swarm_stays_within_its_bound(weights: ModelWeights, split: str, tokens: int,
                                                                     transpose: bool) -> None:
    """The compact profile through real providers: each cut of a call verified within its noise
    (row chunks against their own wider words' bound) and off by no more than the decoded-error
    bound per value (per row chunk added up)."""
    with trio.fail_after(90):
        async with providers(weights, [THIN_ROWS] * 3) as running:
            async with session(weights, [r.addr for r in running], min_providers=3, split=split, profile="compact") as client:
                layer = weights.resolve(LAYER)
                x = random_operand(tokens, layer.shape.d_out if transpose else layer.shape.d_in)
                y = await client.matmul(LAYER, x, transpose=transpose)
                params = client.keys.channel(layer, transpose=transpose).params
                assert params.compact
                parts = 3 if split == "rows" else 1
                bound = parts * (params.with_row_parts(parts) if parts > 1 else params).decoded_error
                err = (y - reference(weights, LAYER, x, transpose=transpose)).abs()
                assert 0 < err.max() <= bound
                stats = client.stats()
                assert stats.chunks == 3 and stats.verification_failures == stats.retries == 0


QKV = "model.layers.1.self_attn.q_proj+model.layers.1.self_attn.k_proj+model.layers.1.self_attn.v_proj"


@pytest.mark.parametrize(("split", "tokens", "transpose"), [("columns", 100, False), ("rows", 300, True), ("blocks", 4500, True)])
async def test_a_group_is_one_exact_call_equal_to_its_members(weights: ModelWeights, split: str, tokens: int, transpose: bool) -> None:
    """q, k and v as one layer [Wq | Wk | Wv] over libp2p: forward, the members' products side by
    side; backward, their sum; each cut of the call (columns across members' boundaries, rows,
    blocks) exact, and one upload per chunk."""
    members = QKV.split("+")
    with trio.fail_after(90):
        async with providers(weights, [THIN_ROWS] * 3) as running:
            async with session(weights, [r.addr for r in running], min_providers=3, split=split) as client:
                group = weights.resolve(QKV)
                assert group.shape.d_out == sum(weights.resolve(m).shape.d_out for m in members)
                x = random_operand(tokens, group.shape.d_out if transpose else group.shape.d_in)
                y = await client.matmul(QKV, x, transpose=transpose)
                if transpose:  # g @ [Wq | Wk | Wv].T = g_q Wq.T + g_k Wk.T + g_v Wv.T
                    widths = [weights.resolve(m).shape.d_out for m in members]
                    separate = sum(reference(weights, m, g, transpose=True) for m, g in zip(members, x.split(widths, dim=1)))
                else:
                    separate = torch.cat([reference(weights, m, x, transpose=False) for m in members], dim=1)
                assert torch.equal(y, separate)
                stats = client.stats()
                assert stats.chunks == 3 and stats.verification_failures == stats.retries == 0


async def test_a_group_goes_only_to_providers_holding_every_member(weights: ModelWeights, model_dir: Path) -> None:
    from cipherswarm.node import load_model

    q_and_k = load_model(model_dir, layers=["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"])
    with trio.fail_after(60):
        async with running_provider(weights, slots=1) as full, running_provider(q_and_k, slots=1, bootstrap=[full.addr]) as part:
            async with session(weights, [full.addr], min_providers=2, split="columns") as client:
                x = random_operand(20, 64)
                assert torch.equal(await client.matmul(QKV, x), reference(weights, QKV, x, transpose=False))
                assert client.stats().chunks_by_peer == {full.node.peer_id.to_base58(): 1}
                assert part.provider.statistics().served == 0


async def test_one_verifiable_receipt_per_accepted_chunk(weights: ModelWeights, tmp_path: Path) -> None:
    with trio.fail_after(90), Ledger(tmp_path / "client.sqlite") as ledger, Ledger(tmp_path / "provider.sqlite") as provider_ledger:
        async with running_provider(weights, price_per_gmac=7, ledger=provider_ledger) as paid:
            async with providers(weights, [{}, {}]) as free:
                addrs = [paid.addr, *(r.addr for r in free)]
                # column chunks: each call reaches all three (by bytes it would go to one; by price,
                # the dear one would get only the chunk that measures it)
                async with session(weights, addrs, ledger=ledger, min_providers=3, split="columns", prefer="speed") as client:
                    for transpose in (False, True):
                        layer = weights.resolve(LAYER)
                        x = random_operand(50, layer.shape.d_out if transpose else layer.shape.d_in)
                        assert torch.equal(await client.matmul(LAYER, x, transpose=transpose), reference(weights, LAYER, x, transpose=transpose))
                    stats = client.stats()
                    client_peer = client.node.peer_id
                    # The paid provider gets its countersigned receipts back (the protocol's ack),
                    # sent after each call returns: wait while both ends still run.
                    with trio.fail_after(5):
                        while len(provider_ledger.receipts()) < stats.chunks_by_peer[paid.node.peer_id.to_base58()]:
                            await trio.sleep(0.05)
        receipts = ledger.receipts()
        assert len(receipts) == stats.chunks == 6
        assert len({r.receipt.request_id for r in receipts}) == 6
        for signed in receipts:
            # an Ed25519 peer id embeds its public key (protocol README, section 5)
            receipt = verify_receipt(signed, provider_key=peer_key(signed.receipt.provider),
                                     client_key=peer_key(client_peer.to_bytes()))
            assert receipt.client == client_peer.to_bytes() and receipt.completed_at_ms <= now_ms()
        assert ledger.total_amount() == stats.paid == sum(r.receipt.amount for r in receipts) > 0
        assert {r.receipt_bytes for r in provider_ledger.receipts()} <= {r.receipt_bytes for r in receipts}


async def test_provider_holding_some_layers_gets_only_those(weights: ModelWeights, model_dir: Path) -> None:
    from cipherswarm.node import load_model

    first_layer_only = load_model(model_dir, layers=["model.layers.0.*"])
    with trio.fail_after(60):
        # One slot each, so that a call of two chunks must use both providers when both hold the layer.
        async with running_provider(weights, slots=1) as full, running_provider(first_layer_only, slots=1, bootstrap=[full.addr]) as part:
            async with session(weights, [full.addr], min_providers=2, split="columns") as client:
                assert client.peers.get(part.node.peer_id).advert.layers == {l.digest for l in first_layer_only.held}
                other = "model.layers.1.self_attn.q_proj.weight"
                x = random_operand(20, 64)
                assert torch.equal(await client.matmul(other, x), reference(weights, other, x, transpose=False))
                assert client.stats().chunks_by_peer == {full.node.peer_id.to_base58(): 1}
                assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                assert part.node.peer_id.to_base58() in client.stats().chunks_by_peer


async def test_sync_client_from_torch_threads(weights: ModelWeights, model_dir: Path, tmp_path: Path) -> None:
    """The trainer's view: a context manager, and matmul/stats from plain (non-trio) threads."""
    with trio.fail_after(90):
        async with providers(weights, [{}, {}]) as running:
            addrs = [str(r.addr) for r in running]

            def train_step() -> tuple[bool, object]:
                with SwarmClient(model_dir=model_dir, bootstrap=addrs, ledger=tmp_path / "c.sqlite", min_providers=2,
                                 config=client_config()) as client:
                    x = random_operand(30, 64)
                    started = time.perf_counter()
                    y = client.matmul("model.layers.0.self_attn.k_proj", x, transpose=False)
                    g = client.matmul("model.layers.0.self_attn.k_proj.weight", x, transpose=True)
                    exact = torch.equal(y, reference(weights, "model.layers.0.self_attn.k_proj", x, transpose=False)) and torch.equal(
                        g, reference(weights, "model.layers.0.self_attn.k_proj", x, transpose=True)
                    )
                    assert time.perf_counter() - started < 30
                    return exact, client.stats()

            exact, stats = await trio.to_thread.run_sync(train_step)
            assert exact
            assert stats.calls == 2 and stats.bytes_sent > 0 and stats.bytes_received > 0 and stats.macs > 0  # type: ignore[attr-defined]


async def test_calls_from_several_threads_at_once(weights: ModelWeights, model_dir: Path, tmp_path: Path) -> None:
    """Micro-batches in flight together (trainer/overlap.py) call the client from several threads at
    once: every call exact, each its own."""
    from concurrent.futures import ThreadPoolExecutor

    calls = [(QKV, False, 40), (QKV, True, 50), ("model.layers.0.mlp.down_proj", False, 60), ("model.layers.0.mlp.down_proj", True, 70)]
    with trio.fail_after(120):
        async with providers(weights, [{}, {}]) as running:
            addrs = [str(r.addr) for r in running]

            def several() -> tuple[list[bool], object]:
                with SwarmClient(model_dir=model_dir, bootstrap=addrs, ledger=tmp_path / "c.sqlite", min_providers=2,
                                 config=client_config()) as client:
                    def one(call: tuple[str, bool, int]) -> bool:
                        key, transpose, tokens = call
                        layer = weights.resolve(key)
                        x = random_operand(tokens, layer.shape.d_out if transpose else layer.shape.d_in)
                        return torch.equal(client.matmul(key, x, transpose=transpose), reference(weights, key, x, transpose=transpose))

                    with ThreadPoolExecutor(max_workers=len(calls)) as pool:
                        return list(pool.map(one, calls)), client.stats()

            exact, stats = await trio.to_thread.run_sync(several)
            assert exact == [True] * len(calls)
            assert stats.calls == len(calls) and stats.verification_failures == 0  # type: ignore[attr-defined]
