"""Providers as separate `cipherswarm provider` processes (started as the testnet starts them), and the
other commands."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import trio
from multiaddr import Multiaddr

from cipherswarm.node import ModelWeights

from node_factory import PROCESS_START_S, REPO, launch_provider, provider_process, random_operand, reference, session

LAYER = "model.layers.1.self_attn.o_proj"


@pytest.fixture(scope="module")
def two_providers(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Multiaddr]]:
    """Two honest provider processes, the second joined through the first."""
    tmp = tmp_path_factory.mktemp("providers")
    first = launch_provider(model_dir, tmp)
    try:
        first.wait_addr(PROCESS_START_S)
        second = launch_provider(model_dir, tmp, bootstrap=[first.multiaddr])
        try:
            second.wait_addr(PROCESS_START_S)
            yield [first.multiaddr, second.multiaddr]
        finally:
            assert second.stop() == 0  # SIGTERM stops a provider cleanly
    finally:
        first.stop()


def _peer(addr: Multiaddr) -> str:
    return addr.value_for_protocol("p2p")


async def test_provider_killed_mid_call(weights: ModelWeights, model_dir: Path, tmp_path: Path, two_providers: list[Multiaddr]) -> None:
    with trio.fail_after(120):
        # The victim sits on its chunk for 10 s, so it is surely mid-call when killed.
        async with provider_process(model_dir, tmp_path, "--delay", "10", bootstrap=[two_providers[0]]) as victim:
            # Joined through the first provider only: the others are found through the DHT and gossip.
            started = trio.current_time()
            # Column chunks: the call reaches the victim too (by bytes it would go to one provider).
            async with session(weights, [two_providers[0]], min_providers=3, hedge_min_s=60, split="columns") as client:
                discovery_s = trio.current_time() - started
                x = random_operand(100, 64)
                result: list[torch.Tensor] = []

                async def call() -> None:
                    result.append(await client.matmul(LAYER, x))

                async with trio.open_nursery() as nursery:
                    nursery.start_soon(call)
                    with trio.fail_after(10):
                        while client.peers.get(victim_id := _peer_id(client, victim.multiaddr)).in_flight == 0:
                            await trio.sleep(0.05)
                    await trio.sleep(0.5)
                    killed_at = trio.current_time()
                    victim.proc.kill()
                assert trio.current_time() - killed_at < 5
                assert torch.equal(result[0], reference(weights, LAYER, x, transpose=False))
                stats = client.stats()
                assert stats.timeouts == 1 and victim_id.to_base58() in stats.bans
                assert victim_id.to_base58() not in stats.chunks_by_peer
                assert discovery_s < 15


def _peer_id(client: object, addr: Multiaddr) -> object:
    from libp2p.peer.id import ID

    return ID.from_base58(_peer(addr))


async def test_cheat_flag_of_a_provider_process_is_caught(weights: ModelWeights, model_dir: Path, tmp_path: Path, two_providers: list[Multiaddr]) -> None:
    with trio.fail_after(120):
        async with provider_process(model_dir, tmp_path, "--cheat", "wrong-weights", "--slots", "1", bootstrap=[two_providers[0]]) as cheater:
            # column chunks: every call reaches the cheater too (by bytes it would go to one provider)
            async with session(weights, [cheater.multiaddr, *two_providers], min_providers=3, split="columns") as client:
                bad = _peer(cheater.multiaddr)
                for _ in range(3):
                    x = random_operand(100, 64)
                    assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                    assert bad in client.stats().bans
                    client.peers.forgive(_peer_id(client, cheater.multiaddr))  # type: ignore[arg-type]
                assert client.stats().verification_failures == 3


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cipherswarm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=60, env=env)


async def test_status_command_lists_the_providers(two_providers: list[Multiaddr], model_dir: Path, tmp_path: Path) -> None:
    with trio.fail_after(90):
        done = await trio.to_thread.run_sync(
            lambda: _cli("status", "--bootstrap", str(two_providers[0]), "--model", str(model_dir), "--wait", "4",
                         "--ledger", str(tmp_path / "c.sqlite"))
        )
    assert done.returncode == 0, done.stderr
    assert all(_peer(addr) in done.stdout for addr in two_providers), done.stdout + done.stderr
    assert "reputation" in done.stdout.splitlines()[0]
    assert done.stderr.strip().endswith("2 provider(s)")  # and no libp2p warnings on the terminal


def test_identity_command_creates_a_private_key_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from cipherswarm.cli.main import main

    key = tmp_path / "id.key"
    assert main(["identity", "--file", str(key)]) == 0
    first = capsys.readouterr()
    assert "created" in first.err and first.out.startswith("12D3KooW")
    assert (key.stat().st_mode & 0o777) == 0o600
    assert main(["identity", "--file", str(key)]) == 0
    assert capsys.readouterr().out == first.out
    key.chmod(0o644)
    assert main(["identity", "--file", str(key)]) == 1
    assert "chmod 600" in capsys.readouterr().err
    assert main(["identity", "--file", str(tmp_path / "missing.key"), "--no-create"]) == 1
