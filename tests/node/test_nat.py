"""Providers behind NAT, reached through a circuit relay v2 (node/nat).

In-process tests on loopback check the reservation's life (a refusal says why; a lost one is made
again), that a peer known only by its relayed address is dialed through the relay, and that
`relay="auto"` leaves a reachable node direct. The NAT test builds network namespaces (node/nat/netns.py: a public bridge with this process and the relay, a
home network behind a MASQUERADE router) and runs the relay and the provider as `cipherswarm
provider` processes inside them: the provider finds itself unreachable (AutoNAT) and reserves on
its bootstrap peer, the relay.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cipherswarm.cli.localswarm import ProviderProcess
from cipherswarm.node import ModelWeights, NodeHost, open_host
from cipherswarm.node.nat import RelayServiceConfig, is_circuit
from cipherswarm.node.nat.netns import LabUnavailable, NatLab

from node_factory import PROCESS_BENCHMARK_S, random_operand, reference, serving, session

LAYER = "model.layers.1.self_attn.o_proj"


def _relayed_connection(node: NodeHost, peer: ID) -> bool:
    conns = node.host.get_network().get_connections(peer)
    return bool(conns) and all(any(is_circuit(a) for a in c.get_transport_addresses()) for c in conns)


@asynccontextmanager
async def _relay_node(key_pair: KeyPair, port: int = 0, **config: int) -> AsyncIterator[NodeHost]:
    async with open_host(key_pair, listen=[Multiaddr(f"/ip4/127.0.0.1/tcp/{port}")],
                         relay_service=RelayServiceConfig(**config)) as node:
        yield node


async def test_a_full_relay_refuses_and_the_provider_says_why(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="cipherswarm.node.nat")
    with trio.fail_after(30):
        async with _relay_node(create_new_key_pair(), slots=0) as relay:
            async with open_host(create_new_key_pair(), relay=relay.addrs()[0]) as node:
                assert node.reservation is not None and not node.relayed
                assert not any(is_circuit(a) for a in node.addrs())  # still named by its listen address
    refusals = [r.getMessage() for r in caplog.records if "refused the reservation" in r.getMessage()]
    assert refusals and "RESOURCE_LIMIT_EXCEEDED (its reservation slots are full)" in refusals[0]
    assert "retrying in" in refusals[0]


async def _relay_until(stop: trio.Event, stopped: trio.Event, key_pair: KeyPair, *,
                       task_status: trio.TaskStatus[Multiaddr] = trio.TASK_STATUS_IGNORED) -> None:
    """A relay node until `stop`; `stopped` once its host, listener included, is closed (libp2p
    listens with SO_REUSEPORT: a closing listener on the port would take some of the new one's dials)."""
    async with _relay_node(key_pair) as relay:
        task_status.started(relay.addrs()[0])
        await stop.wait()
    stopped.set()


async def test_a_lost_reservation_is_made_again_and_the_relayed_address_works() -> None:
    relay_key = create_new_key_pair()
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            stop, stopped = trio.Event(), trio.Event()
            relay_addr: Multiaddr = await nursery.start(_relay_until, stop, stopped, relay_key)
            port = int(relay_addr.value_for_protocol("tcp"))
            async with open_host(create_new_key_pair(), relay=relay_addr) as provider:
                assert provider.relayed and provider.reservation is not None
                assert provider.reservation.reservations == 1
                relayed = provider.addrs()
                assert [str(a) for a in relayed] == [f"{relay_addr}/p2p-circuit/p2p/{provider.peer_id}"]
                stop.set()  # the relay stops, and comes back on the same key and port
                await stopped.wait()
                async with _relay_node(relay_key, port):
                    while provider.reservation.reservations < 2:
                        await trio.sleep(0.1)
                    assert provider.relayed and provider.addrs() == relayed
                    async with open_host(create_new_key_pair()) as client:
                        # known only by its relayed address: the dial goes through the relay
                        assert await client.connect(relayed[0]) == provider.peer_id
                        assert _relayed_connection(client, provider.peer_id)
                        assert _relayed_connection(provider, client.peer_id)


async def test_auto_relay_leaves_a_reachable_node_direct() -> None:
    """On loopback the bootstrap peer dials back: public, so no reservation, though it relays."""
    with trio.fail_after(30):
        async with _relay_node(create_new_key_pair()) as relay:
            async with open_host(create_new_key_pair(), bootstrap=relay.addrs(), relay="auto") as node:
                assert node.reservation is None and not node.relayed
                assert not any(is_circuit(a) for a in node.addrs())


async def test_a_node_without_reservation_takes_no_relayed_connection() -> None:
    """Only the relay a node holds a reservation on may hand it relayed connections (StopGuard)."""
    with trio.fail_after(30):
        async with _relay_node(create_new_key_pair()) as relay, open_host(create_new_key_pair()) as plain:
            await plain.connect(relay.addrs()[0])
            async with open_host(create_new_key_pair()) as client:
                with pytest.raises(Exception, match="cannot reach"):
                    await client.connect(Multiaddr(f"{relay.addrs()[0]}/p2p-circuit/p2p/{plain.peer_id}"))
                assert not client.host.get_network().get_connections(plain.peer_id)


@pytest.fixture
def lab() -> Iterator[NatLab]:
    """One home network behind NAT; removed after the test, also when it fails."""
    try:
        lab = NatLab(homes=1).open()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield lab
    finally:
        lab.close()


def _start_in(lab: NatLab, namespace: str, ip: str, run_dir: Path, name: str, model_dir: Path,
              *args: str) -> ProviderProcess:
    proc, log = lab.start_provider(namespace, ip, run_dir, name, model_dir, "--benchmark-seconds",
                                   str(PROCESS_BENCHMARK_S), *args)
    return ProviderProcess(0, proc, log, 0, [], None)


@pytest.mark.slow
async def test_provider_behind_nat_computes_through_the_relay(lab: NatLab, weights: ModelWeights, model_dir: Path,
                                                              tmp_path: Path) -> None:
    with trio.fail_after(150):
        # the relay is a provider too, holding another layer than the one asked for
        relay_proc = _start_in(lab, lab.public_ns, lab.relay_ip, tmp_path, "relay", model_dir, "--relay-service",
                               "--layers", "model.layers.0.*")
        async with serving(relay_proc) as relay:
            # --relay auto (the default): its bootstrap peer cannot dial it back, and relays
            home = _start_in(lab, lab.home_ns(0), lab.home_ip(0), tmp_path, "home", model_dir, "--bootstrap", relay.addr)
            async with serving(home):
                assert home.addr == f"{relay.addr}/p2p-circuit/p2p/{home.peer_id}"
                # NAT: nothing reaches the home address from the public side
                with pytest.raises(OSError):
                    with trio.fail_after(5):
                        await trio.open_tcp_stream(lab.home_ip(0), 4001)
                async with session(weights, [relay.multiaddr], min_providers=2) as client:
                    x = random_operand(100, 64)
                    y = await client.matmul(LAYER, x)
                    assert torch.equal(y, reference(weights, LAYER, x, transpose=False))
                    home_id = ID.from_base58(home.peer_id)
                    assert _relayed_connection(client.node, home_id)
                    views = {v.peer: v for v in client.stats().peers}
                    assert views[home.peer_id].relayed and not views[relay.peer_id].relayed
                    assert client.stats().chunks_by_peer == {home.peer_id: 1}
                status = await trio.run_process(
                    [sys.executable, "-m", "cipherswarm.cli", "status", "--bootstrap", relay.addr, "--wait", "4",
                     "--ledger", str(tmp_path / "status.sqlite")], capture_stdout=True, capture_stderr=True)
                rows = {line.split()[0]: line.split()[-1] for line in status.stdout.decode().splitlines()[1:]}
                assert rows == {home.peer_id: "relayed", relay.peer_id: "direct"}
