"""The client's chunk decisions (client/decisions.py): on their own, as the real client drives them
over libp2p, and as the simulator replays them, which must decide exactly alike."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
import trio
from libp2p.peer.id import ID

from cipherswarm.node import Cheat, ClientConfig, Ledger, ModelWeights, ProvidersCheatingError
from cipherswarm.node.client.decisions import Act, Backoff, CallDecisions, Decision, Send, Wait
from cipherswarm.node.client.peers import Need, PeerTable
from cipherswarm.node.client.router import AttemptFailed, ChunkRouter, FailureKind
from cipherswarm.node.errors import ChunkFailedError, NoProvidersError
from cipherswarm.node.sim import ProviderSpec, Swarm, Workload
from cipherswarm.node.sim.engine import Simulator
from cipherswarm.node.sim.policy import Client as SimClient
from cipherswarm.node.sim.swarm import ClientSpec
from cipherswarm.node.types import Chunk
from cipherswarm.protocol import Range
from cipherswarm.trainer.workload import traced_model

from node_factory import client_config, providers, random_operand, reference, session
from test_routing import NEED, advert

TOKENS = 100  # one ring block: a one-chunk call
GATE_UP = "model.layers.0.mlp.gate_proj+model.layers.0.mlp.up_proj"  # 64 -> 256, a group as the trainer calls it


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _call(config: ClientConfig, count: int, **advert_fields: object) -> tuple[CallDecisions, list[ID], Clock, list[Decision]]:
    """The decisions of a one-chunk call over `count` fresh providers, on a hand-moved clock."""
    clock, journal = Clock(), []
    table = PeerTable(ledger=Ledger(), clock=clock)
    adverts = [advert(**advert_fields) for _ in range(count)]  # type: ignore[arg-type]
    for a in adverts:
        table.update(a)
    chunk = Chunk(0, Range(0, 1), Range(0, 1), Range(0, 1))
    call = CallDecisions(ChunkRouter(table, config), [chunk], layer="l", clock=clock, rng=random.Random(1),
                         journal=journal.append)
    return call, [a.peer for a in adverts], clock, journal


class TestChunkDecisions:
    def test_a_provider_that_failed_is_asked_again_only_after_a_doubling_backoff(self) -> None:
        config = ClientConfig(retry_base_s=0.2, retry_max_s=1.0)
        call, (peer,), _, journal = _call(config, 1)
        decisions = call.chunk(call.plan[0], NEED)
        delays = []
        for failures in range(1, 5):
            step = decisions.next()
            assert isinstance(step, Send) and step.state.peer == peer and step.retry == (failures > 1)
            assert not decisions.failed(AttemptFailed(peer, FailureKind.REFUSED, "no"))  # refused: no ban, no rotation
            decisions.released(peer)
            decisions.race_over()
            backoff = decisions.next()
            assert isinstance(backoff, Backoff)
            delays.append(backoff.seconds)
        for seconds, ceiling in zip(delays, [0.2, 0.4, 0.8, 1.0]):
            assert ceiling / 2 <= seconds <= ceiling  # doubling, capped, with jitter
        assert [d.act for d in journal[:4]] == [Act.SEND, Act.FAILED, Act.BACKOFF, Act.SEND]
        assert journal[1].kind is FailureKind.REFUSED and journal[3].retry

    def test_retries_go_elsewhere_first_and_attempts_run_out(self) -> None:
        call, peers, _, _ = _call(ClientConfig(max_attempts=3), 2)
        decisions = call.chunk(call.plan[0], NEED)
        chosen = []
        for _ in range(3):
            step = decisions.next()
            if isinstance(step, Backoff):
                step = decisions.next()
            assert isinstance(step, Send)
            chosen.append(step.state.peer)
            decisions.failed(AttemptFailed(step.state.peer, FailureKind.REFUSED, "no"))
            decisions.released(step.state.peer)
            decisions.race_over()
        assert set(chosen[:2]) == set(peers)  # the second attempt went to the other provider
        with pytest.raises(ChunkFailedError, match="failed 3 times"):
            decisions.next()

    def test_nobody_usable_means_waiting_then_no_providers(self) -> None:
        call, (peer,), clock, _ = _call(ClientConfig(wait_providers_s=5.0), 1)
        decisions = call.chunk(call.plan[0], NEED)
        step = decisions.next()
        assert isinstance(step, Send)
        decisions.failed(AttemptFailed(peer, FailureKind.TIMEOUT, "slow"))  # banned for ban_base_s (10 s)
        decisions.released(peer)
        decisions.race_over()
        assert decisions.next() == Wait(5.0)  # the ban outlasts the wait: wait that long, no more
        clock.now = 5.0
        with pytest.raises(NoProvidersError, match=r"banned for 5 s\), after: .*timeout: slow"):
            decisions.next()

    def test_busy_replies_pace_retries_without_using_up_attempts(self) -> None:
        call, (peer,), clock, _ = _call(ClientConfig(max_attempts=1, wait_providers_s=3.0), 1)
        decisions = call.chunk(call.plan[0], NEED)
        for _ in range(3):
            step = decisions.next()
            assert isinstance(step, Send) and not step.retry  # BUSY is no failure: never a backoff either
            decisions.failed(AttemptFailed(peer, FailureKind.BUSY, "busy", retry_after_s=1.0))
            decisions.released(peer)
            decisions.race_over()
            assert decisions.next() == Wait(1.0)  # the provider's hint
            clock.now += 1.5
        with pytest.raises(NoProvidersError, match="all stayed busy"):
            decisions.next()

    def test_a_hedge_goes_to_another_provider_and_the_winner_is_accepted_once(self) -> None:
        call, peers, _, journal = _call(ClientConfig(), 2)
        decisions = call.chunk(call.plan[0], NEED)
        first = decisions.next()
        assert isinstance(first, Send)
        hedge = decisions.hedge(first.state)
        assert hedge is not None and hedge.peer != first.state.peer
        decisions.accept(hedge.peer, elapsed_s=0.1, compute_s=0.05, macs=NEED.macs, amount=0, payload=0, reply=0,
                         reply_s=0.0)
        decisions.straggled(first.state.peer, 0.1)
        assert decisions.accepted and call.pending() == []
        assert [(d.act, d.peer) for d in journal] == [
            (Act.SEND, first.state.peer), (Act.HEDGE, hedge.peer), (Act.ACCEPT, hedge.peer), (Act.STRAGGLER, first.state.peer)]


class TestRotations:
    def test_each_cheating_identity_costs_one_rotation_and_never_ends_the_call(self) -> None:
        call, peers, _, journal = _call(ClientConfig(), 6)
        for cheater in peers[:5]:  # more identities than any per-call cap of rotations would allow
            decisions = call.chunk(call.plan[0], NEED)
            step = decisions.next()
            assert isinstance(step, Send) and step.state.peer not in {d.peer for d in journal if d.act is Act.ROTATE}
            assert decisions.failed(AttemptFailed(step.state.peer, FailureKind.CHEATED, "wrong result"))
            decisions.released(step.state.peer)
            call.rotate(call.plan[0], step.state.peer)
        assert sum(d.act is Act.ROTATE for d in journal) == 5
        assert set(call.router.table.bans()) == {d.peer.to_base58() for d in journal if d.act is Act.ROTATE}
        honest = call.chunk(call.plan[0], NEED).next()  # the one left is never banned
        assert isinstance(honest, Send) and honest.state.peer.to_base58() not in call.router.table.bans()

    def test_an_identity_that_cheats_again_after_its_ban_is_lifted_ends_the_call(self) -> None:
        call, (peer,), _, _ = _call(ClientConfig(max_rotations_per_peer=1), 1)
        call.rotate(call.plan[0], peer)
        with pytest.raises(ProvidersCheatingError, match="after 1 key rotations"):
            call.rotate(call.plan[0], peer)


# -- one scenario, decided by the real client over libp2p and by the simulator -----------------------

SCENARIO = dict(split="blocks", price_weight_s=1000.0, hedge_min_s=2.0, hedge_factor=1.0)
# Roles in the order of the providers started and simulated. Prices rank them for the client (the
# scenario's config makes the price dominate every score), so its choices do not hang on which advert
# arrived first: the cheater is tried first, then the straggler, hedged by the honest one.
ROLES = ("honest", "straggler", "cheater")
PRICES = (3, 2, 1)
STRAGGLE_S = 20.0  # the straggler's delay before each product: far beyond the 2 s hedge

EXPECTED = [  # (act, chunk, role, failure kind, retry)
    ("send", 0, "cheater", None, False),
    ("failed", 0, "cheater", "cheated", False),
    ("rotate", 0, "cheater", None, False),
    ("send", 0, "straggler", None, False),
    ("hedge", 0, "honest", None, False),
    ("accept", 0, "honest", None, False),
    ("straggler", 0, "straggler", None, False),
    # the second call: the straggler, never measured, still gets its one try, and is hedged again
    ("send", 0, "straggler", None, False),
    ("hedge", 0, "honest", None, False),
    ("accept", 0, "honest", None, False),
    ("straggler", 0, "straggler", None, False),
]


def _readable(journal: list[Decision], roles: dict[ID, str]) -> list[tuple[object, ...]]:
    return [(d.act.value, d.chunk, roles[d.peer], d.kind.value if d.kind else None, d.retry) for d in journal]


async def _real_decisions(weights: ModelWeights) -> list[tuple[object, ...]]:
    configs = [dict(price_per_gmac=PRICES[0]), dict(price_per_gmac=PRICES[1], delay_s=STRAGGLE_S),
               dict(price_per_gmac=PRICES[2], cheat=Cheat.FLIP)]
    async with providers(weights, configs) as started:
        async with session(weights, [started[0].addr], min_providers=3, **SCENARIO) as client:
            journal: list[Decision] = []
            client.journal = journal.append
            for _ in range(2):
                x = random_operand(TOKENS, 64)
                assert torch.equal(await client.matmul(GATE_UP, x), reference(weights, GATE_UP, x, transpose=False))
            return _readable(journal, {p.node.peer_id: role for p, role in zip(started, ROLES)})


def _simulated_decisions(model_dir: Path) -> list[tuple[object, ...]]:
    work = Workload(traced_model(model_dir), tokens=TOKENS, micro_batch_tokens=TOKENS, seq_len=TOKENS)
    product = next(p for p in work.products(TOKENS, backward=False) if p.key == GATE_UP)
    fast = dict(macs_per_s=1e9, rtt_s=0.002)
    specs = (ProviderSpec(price_per_gmac=PRICES[0], **fast), ProviderSpec(price_per_gmac=PRICES[1], macs_per_s=1e9, rtt_s=2 * STRAGGLE_S),
             ProviderSpec(price_per_gmac=PRICES[2], cheats=True, **fast))
    sim, journal = Simulator(), []
    client = SimClient(sim, Swarm(ClientSpec(), specs), work.model, client_config(**SCENARIO), random.Random(0),
                       journal=journal.append)
    calls_done = []

    def calls(left: int) -> None:
        calls_done.append(sim.now)
        if left:
            client.call(product, lambda: calls(left - 1))

    sim.after(0.0, lambda: calls(2))
    sim.run()
    assert len(calls_done) == 3 and client.tally.rotations == 1 and client.tally.hedges == 2
    return _readable(journal, {node.peer: role for node, role in zip(client.nodes.values(), ROLES)})


async def test_the_simulator_decides_as_the_real_client_does(weights: ModelWeights, model_dir: Path) -> None:
    """Three providers: one cheats (banned, keys rotated, the chunk sent again), one straggles
    (hedged by the honest one, whose result wins). The real client over libp2p and the simulator
    make the same decisions in the same order."""
    with trio.fail_after(90):
        real = await _real_decisions(weights)
    simulated = _simulated_decisions(model_dir)
    assert real == EXPECTED
    assert simulated == real


async def test_five_cheating_identities_do_not_end_a_call_while_an_honest_provider_is_left(weights: ModelWeights) -> None:
    """Sybils: five identities that each return a wrong result cost a key rotation each (more than
    a per-call cap of four would allow); each is banned for good and the call completes, exactly."""
    cheaters = 5
    configs = [dict(price_per_gmac=2)] + [dict(price_per_gmac=1, cheat=Cheat.FLIP)] * cheaters  # cheapest first
    with trio.fail_after(120):
        async with providers(weights, configs) as (honest, *sybils):
            # no hedges: one cheater at a time
            async with session(weights, [honest.addr], min_providers=1 + cheaters, split="blocks",
                               price_weight_s=1000.0, hedge_min_s=30.0) as client:
                journal: list[Decision] = []
                client.journal = journal.append
                x = random_operand(TOKENS, 64)
                assert torch.equal(await client.matmul(GATE_UP, x), reference(weights, GATE_UP, x, transpose=False))
                stats = client.stats()
                assert stats.key_rotations == stats.verification_failures == cheaters
                assert set(stats.bans) == {s.node.peer_id.to_base58() for s in sybils}
                assert [d.peer for d in journal if d.act is Act.ACCEPT] == [honest.node.peer_id]
                assert {d.peer for d in journal if d.act is Act.ROTATE} == {s.node.peer_id for s in sybils}
