"""Providers behind NAT, reached through a circuit relay v2 (node/nat).

In-process tests on loopback check the reservation's life (a refusal says why; a lost one is made
again; a relay that refuses or is gone for good is left for the next), that a peer known only by
its relayed address is dialed through the relay, that `relay="auto"` leaves a reachable node
direct, that a restarted bootstrap peer is joined again, and the bounds on hole punching (which
addresses a punch dials, which sessions a node answers).
The NAT tests build network namespaces (node/nat/netns.py: a public bridge with this process and
the relay, home networks each behind its own MASQUERADE router) and run the relay and the providers
as `cipherswarm provider` processes inside them: a provider finds itself unreachable (AutoNAT) and
reserves on its bootstrap peer, the relay. Through them the client computes one product, reaches
a provider behind a cone or a symmetric NAT directly after a hole punch, fine-tunes the bundled
model through two NATed providers, and fine-tunes through a relay killed mid-run; the fine-tunes'
losses are the clear integer run's, bit for bit.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.abc import INetStream
from libp2p.crypto.keys import KeyPair
from libp2p.network.stream.exceptions import StreamReset
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.relay.circuit_v2.dcutr import PROTOCOL_ID as DCUTR_PROTOCOL_ID
from libp2p.relay.circuit_v2.dcutr import read_dcutr_msg
from libp2p.relay.circuit_v2.pb.dcutr_pb2 import HolePunch
from libp2p.relay.circuit_v2.utils import write_delimited_msg
from multiaddr import Multiaddr

from cipherswarm.cli.localswarm import ProviderProcess, start_provider
from cipherswarm.node import ClientConfig, ClientStats, ModelWeights, NodeHost, SwarmClient, open_host
from cipherswarm.node.host import REJOIN_S
from cipherswarm.node.nat import RelayReservation, RelayServiceConfig, StopGuard, circuit_protocol, is_circuit
from cipherswarm.node.nat.directory import MAX_DHT_RELAYS, RELAY_KEY, relays_in_dht
from cipherswarm.node.nat.punch import MAX_ANSWERS, MAX_PUNCH_ADDRS, dialable
from cipherswarm.node.nat.relay import RELAY_TIMEOUT_S, RETRY_MIN_S
from cipherswarm.node.nat.netns import LabUnavailable, NatLab
from cipherswarm.trainer.finetune import FinetuneConfig, FinetuneResult, finetune
from cipherswarm.trainer.trainer import StepHook

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
            async with open_host(create_new_key_pair(), relay=relay.addrs()) as node:
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
            async with open_host(create_new_key_pair(), relay=[relay_addr]) as provider:
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


async def _wait_reserved_on(node: NodeHost, relay: Multiaddr, limit_s: float) -> float:
    """Seconds until `node` holds a reservation on `relay`; fails past `limit_s`."""
    start = trio.current_time()
    with trio.fail_after(limit_s):
        while not (node.relayed and node.reservation is not None and node.reservation.relay == relay):
            await trio.sleep(0.1)
    return trio.current_time() - start


async def test_a_relay_gone_for_good_is_left_for_the_next_one(caplog: pytest.LogCaptureFixture) -> None:
    """A provider's relay stops and never comes back: after FAILOVER_TRIES failed dials it reserves
    on its second relay, advertises that relayed address, and a client reaches it there."""
    caplog.set_level(logging.WARNING, logger="cipherswarm.node.nat")
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery, _relay_node(create_new_key_pair()) as second:
            stop, stopped = trio.Event(), trio.Event()
            first: Multiaddr = await nursery.start(_relay_until, stop, stopped, create_new_key_pair())
            second_addr = second.addrs()[0]
            async with open_host(create_new_key_pair(), relay=[first, second_addr]) as provider:
                await _wait_reserved_on(provider, first, 5)
                stop.set()
                await stopped.wait()
                # 1 + 2 s of backoff between the three failed dials, then the next relay at once
                assert await _wait_reserved_on(provider, second_addr, 4 * RETRY_MIN_S + 2 * RELAY_TIMEOUT_S) >= 2
                relayed = provider.addrs()
                assert [str(a) for a in relayed] == [f"{second_addr}/p2p-circuit/p2p/{provider.peer_id}"]
                async with open_host(create_new_key_pair()) as client:
                    assert await client.connect(relayed[0]) == provider.peer_id
                    assert _relayed_connection(client, provider.peer_id)
    moved = [r.getMessage() for r in caplog.records if "instead" in r.getMessage()]
    assert len(moved) == 1 and f"trying relay {second_addr} instead" in moved[0]


async def test_a_refusing_relay_is_left_at_once_and_a_round_of_refusals_waits() -> None:
    """A relay that refuses (its slots are full) is left for the next candidate without a wait;
    when every candidate refuses, the node waits out its backoff before the next round instead of
    dialing them in a loop."""
    with trio.fail_after(30):
        async with _relay_node(create_new_key_pair(), slots=0) as full, _relay_node(create_new_key_pair()) as free:
            async with open_host(create_new_key_pair(), relay=[full.addrs()[0], free.addrs()[0]]) as node:
                assert await _wait_reserved_on(node, free.addrs()[0], 2) < 1
        async with _relay_node(create_new_key_pair(), slots=0) as a, _relay_node(create_new_key_pair(), slots=0) as b:
            async with open_host(create_new_key_pair(), relay=[a.addrs()[0], b.addrs()[0]]) as node:
                assert node.reservation is not None
                await trio.sleep(4 * RETRY_MIN_S)  # rounds after waits of 1, then 2 s: at most 3 rounds
                tried = node.reservation.attempts
                assert 2 <= tried <= 6 and not node.relayed


async def test_a_reserving_node_looks_for_new_relays_only_after_a_failed_round() -> None:
    """Every relay it knows refuses: after the round's backoff the node asks `discover` (the DHT in
    `--relay auto`) and reserves on the relay it names; while a reservation holds, it asks nothing."""
    calls = 0
    with trio.fail_after(30):
        async with _relay_node(create_new_key_pair(), slots=0) as full, _relay_node(create_new_key_pair()) as free:
            async def discover() -> list[Multiaddr]:
                nonlocal calls
                calls += 1
                return [free.addrs()[0], full.addrs()[0]]  # a known candidate is not added twice

            async with open_host(create_new_key_pair()) as node, trio.open_nursery() as nursery:
                reservation = RelayReservation(node.host, [full.addrs()[0]], StopGuard(circuit_protocol(node.host, None)),
                                               discover=discover)
                await nursery.start(reservation.run)
                assert calls == 0 and not reservation.active  # refused; the round's backoff runs
                with trio.fail_after(2 * RETRY_MIN_S + RELAY_TIMEOUT_S):
                    while not reservation.active:
                        await trio.sleep(0.05)
                assert reservation.relay == free.addrs()[0] and calls == 1
                await trio.sleep(2 * RETRY_MIN_S)
                assert calls == 1 and reservation.attempts == 3  # full, full again at the new round's start, free
                nursery.cancel_scope.cancel()


async def test_relays_from_the_dht_are_few_and_only_at_addresses_a_node_may_dial() -> None:
    """Anyone may store a relay record with any addresses: a lookup keeps at most MAX_DHT_RELAYS
    relays other than the node itself, each at one TCP address of another machine, named by the
    record's own peer id whatever /p2p/ the address claims."""
    async with open_host(create_new_key_pair()) as node:
        store, key = node.dht.provider_store, bytes.fromhex(RELAY_KEY)
        other = ID.from_pubkey(create_new_key_pair().public_key)
        store.add_provider(key, PeerInfo(node.peer_id, [Multiaddr("/ip4/198.51.100.1/tcp/4001")]))
        liar = ID.from_pubkey(create_new_key_pair().public_key)
        store.add_provider(key, PeerInfo(liar, [Multiaddr("/ip4/127.0.0.1/tcp/4001"), Multiaddr("/ip4/0.0.0.0/tcp/4001"),
                                                Multiaddr(f"/ip4/198.51.100.2/tcp/4001/p2p/{other}/p2p-circuit"),
                                                Multiaddr("/ip4/198.51.100.3/udp/4001"),
                                                Multiaddr("/ip4/169.254.0.1/tcp/4001")]))
        relays = [ID.from_pubkey(create_new_key_pair().public_key) for _ in range(MAX_DHT_RELAYS + 4)]
        for i, relay in enumerate(relays):
            store.add_provider(key, PeerInfo(relay, [Multiaddr("/ip4/127.0.0.1/tcp/1"),
                                                     Multiaddr(f"/ip4/198.51.100.{10 + i}/tcp/4001/p2p/{other}")]))
        found = [str(addr) for addr in await relays_in_dht(node.dht, node.peer_id)]
        expected = {f"/ip4/198.51.100.{10 + i}/tcp/4001/p2p/{relay}" for i, relay in enumerate(relays)}
        assert len(found) == MAX_DHT_RELAYS == len(set(found)) and set(found) <= expected


def test_a_punch_dials_only_a_few_addresses_of_other_machines() -> None:
    """A hole punch never dials loopback, unspecified, multicast, link-local, relayed, non-TCP or
    name addresses a peer put in its CONNECT message, and at most MAX_PUNCH_ADDRS of the rest."""
    relay = "/ip4/203.0.113.9/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    good = ["/ip4/203.0.113.7/tcp/4001", "/ip4/10.1.2.3/tcp/4001", "/ip6/2001:db8::1/tcp/4001",
            "/ip4/198.51.100.1/tcp/1", "/ip4/198.51.100.2/tcp/2"]
    bad = ["/ip4/127.0.0.1/tcp/4001", "/ip4/0.0.0.0/tcp/4001", "/ip4/224.0.0.1/tcp/1", "/ip4/169.254.1.1/tcp/1",
           "/ip6/::1/tcp/1", "/ip4/203.0.113.7/udp/4001", "/dns4/example.com/tcp/1", f"{relay}/p2p-circuit"]
    assert all(dialable(Multiaddr(a)) for a in good) and not any(dialable(Multiaddr(a)) for a in bad)

    async def decode() -> list[Multiaddr]:
        async with open_host(create_new_key_pair()) as node:
            assert node.puncher is not None
            return node.puncher._decode_observed_addrs([Multiaddr(a).to_bytes() for a in bad + good])

    assert [str(a) for a in trio.run(decode)] == good[:MAX_PUNCH_ADDRS]


async def _dcutr_session(client: NodeHost, peer: ID) -> INetStream | None:
    """A hole-punching session opened by hand: the CONNECT sent, the peer's answer still unread;
    None if the peer reset the stream so soon that its protocol negotiation failed (refused)."""
    try:
        stream = await client.host.new_stream(peer, [DCUTR_PROTOCOL_ID])
    except Exception:  # noqa: BLE001  # libp2p's StreamFailure/MultiselectClientError: the reset won the race
        return None
    with contextlib.suppress(StreamReset):  # refused before the CONNECT arrived: `_answered` says so
        await write_delimited_msg(stream, HolePunch(type=HolePunch.CONNECT,
                                                    ObsAddrs=[Multiaddr("/ip4/203.0.113.7/tcp/4001").to_bytes()]))
    return stream


async def _answered(stream: INetStream | None) -> bool:
    """Whether the peer answered the session's CONNECT with its own (rather than resetting it)."""
    if stream is None:
        return False
    try:
        with trio.fail_after(10):
            return (await read_dcutr_msg(stream, HolePunch)).type == HolePunch.CONNECT
    except Exception:  # reset or closed: refused
        return False


async def test_hole_punching_sessions_are_answered_only_on_relayed_connections_and_within_bounds() -> None:
    """A peer cannot make a node dial for it at will: a session on a direct connection is refused,
    so is a second one from the same peer while one is open, and a peer gets MAX_ANSWERS at most."""
    with trio.fail_after(60):
        async with _relay_node(create_new_key_pair()) as relay, \
                open_host(create_new_key_pair(), relay=relay.addrs()) as provider, \
                open_host(create_new_key_pair()) as client:
            direct = await client.connect(provider.host.get_addrs()[0])
            assert client.direct_to(direct)
            assert not await _answered(await _dcutr_session(client, provider.peer_id))
            await client.disconnect(provider.peer_id)
            async with open_host(create_new_key_pair()) as other:  # loopback: it never punches itself
                await other.connect(provider.addrs()[0])
                assert _relayed_connection(other, provider.peer_id)
                first = await _dcutr_session(other, provider.peer_id)
                assert first is not None and await _answered(first)
                assert not await _answered(await _dcutr_session(other, provider.peer_id))  # while `first` is open
                await first.close()  # the provider's side stops waiting for a SYNC
                answered = []
                for _ in range(MAX_ANSWERS):  # the first session was one of the peer's MAX_ANSWERS
                    await trio.sleep(0.5)
                    stream = await _dcutr_session(other, provider.peer_id)
                    answered.append(await _answered(stream))
                    if stream is not None:
                        await stream.close()
                assert answered == [True] * (MAX_ANSWERS - 1) + [False]
                assert _relayed_connection(other, provider.peer_id)  # none of it was ever dialed


def test_the_relay_flags() -> None:
    """`--relay` defaults to auto, repeats for relays to fail over to, and refuses a mix of
    auto/off with addresses or an address that does not name the relay's peer."""
    from cipherswarm.cli.main import build_parser
    from cipherswarm.cli.provider import relay_options

    parse = build_parser("provider").parse_args
    a = "/ip4/10.0.0.1/tcp/4001/p2p/12D3KooWQYhTNQdmr3ArTeUHRYzFg94BKyTkoWBDWez9kSCVe2Xo"
    b = "/ip4/10.0.0.2/tcp/4001/p2p/12D3KooWSZe1uZ8G4LrpEHaDYRUw2KbhjKMmBWnkLFUDT5yxHTG9"
    assert relay_options(parse(["provider", "--model", "m"])) == (None, "auto")
    assert relay_options(parse(["provider", "--model", "m", "--relay", "off"])) == (None, None)
    assert relay_options(parse(["provider", "--model", "m", "--relay", a, "--relay", b]))[1] == [Multiaddr(a), Multiaddr(b)]
    for bad in (["--relay", "auto", "--relay", a], ["--relay", "/ip4/10.0.0.1/tcp/4001"],
                ["--relay", f"{a}/p2p-circuit"]):
        with pytest.raises(ValueError, match="--relay"):
            relay_options(parse(["provider", "--model", "m", *bad]))


async def test_a_restarted_bootstrap_peer_is_joined_again() -> None:
    """A node's bootstrap peer (a relay, say) stops, stays away past a failed dial, and comes back
    on the same key and port: the node connects to it again by itself, within a few REJOIN_S,
    though py-libp2p would refuse every dial to it for 60 s after the failed one."""
    relay_key = create_new_key_pair()
    with trio.fail_after(40):
        async with trio.open_nursery() as nursery:
            stop, stopped = trio.Event(), trio.Event()
            relay_addr: Multiaddr = await nursery.start(_relay_until, stop, stopped, relay_key)
            port = int(relay_addr.value_for_protocol("tcp"))
            relay_id = info_from_p2p_addr(relay_addr).peer_id
            async with open_host(create_new_key_pair(), bootstrap=[relay_addr]) as node:
                network = node.host.get_network()
                assert network.get_connections(relay_id)
                stop.set()
                await stopped.wait()
                await trio.sleep(REJOIN_S + 1)  # a round of `rejoin` found it gone
                assert not network.get_connections(relay_id)
                async with _relay_node(relay_key, port):
                    back = trio.current_time()
                    while not network.get_connections(relay_id):
                        await trio.sleep(0.1)
                    assert trio.current_time() - back <= 2 * REJOIN_S


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


@contextmanager
def _lab(homes: int, symmetric: frozenset[int] = frozenset()) -> Iterator[NatLab]:
    """`homes` home networks, each behind its own NAT router (cone, or symmetric for the homes in
    `symmetric`); removed after the test, also when it fails."""
    try:
        lab = NatLab(homes=homes, symmetric=symmetric).open()
    except LabUnavailable as exc:
        pytest.skip(str(exc))
    try:
        yield lab
    finally:
        lab.close()


@pytest.fixture
def lab() -> Iterator[NatLab]:
    with _lab(1) as one:
        yield one


@pytest.fixture
def two_homes() -> Iterator[NatLab]:
    with _lab(2) as two:
        yield two


def _start_in(lab: NatLab, namespace: str, ip: str, run_dir: Path, name: str, model_dir: Path,
              *args: str) -> ProviderProcess:
    """`cipherswarm provider` inside `namespace` on `ip`:4001 (each namespace has its own ports), asking 0."""
    return start_provider(0, model=model_dir, run_dir=run_dir, name=name, listen=f"/ip4/{ip}/tcp/4001",
                          prefix=lab.exec_prefix(namespace), price=0, benchmark_s=PROCESS_BENCHMARK_S,
                          extra_args=args, env={"OMP_NUM_THREADS": "1"})


@pytest.mark.slow
async def test_provider_behind_nat_computes_through_the_relay(lab: NatLab, weights: ModelWeights, model_dir: Path,
                                                              tmp_path: Path) -> None:
    with trio.fail_after(35):  # 17 s measured on 2 busy cores
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


@pytest.mark.slow
async def test_a_home_provider_reserves_on_a_relay_it_finds_in_the_dht(lab: NatLab, model_dir: Path,
                                                                       tmp_path: Path) -> None:
    """--relay auto with a bootstrap peer that does not relay: the home provider finds the relay's
    record in the DHT, reserves there, and is reached through it."""
    with trio.fail_after(20):  # 9 s measured
        async with open_host(create_new_key_pair(), listen=[Multiaddr(f"/ip4/{lab.client_ip}/tcp/0")]) as boot:
            boot_addr = str(boot.addrs()[0])
            relay_proc = _start_in(lab, lab.public_ns, lab.relay_ip, tmp_path, "relay", model_dir, "--relay-service",
                                   "--layers", "model.layers.0.*", "--bootstrap", boot_addr)
            async with serving(relay_proc) as relay:
                relay_id = ID.from_base58(relay.peer_id)
                while relay_id not in {info.peer_id for info in await boot.dht.find_providers(RELAY_KEY)}:
                    await trio.sleep(0.2)
                home = _start_in(lab, lab.home_ns(0), lab.home_ip(0), tmp_path, "home", model_dir, "--bootstrap",
                                 boot_addr)
                async with serving(home):
                    # its only bootstrap peer does not relay: the relay came from the DHT
                    assert home.addr == f"{relay.addr}/p2p-circuit/p2p/{home.peer_id}"
                    async with open_host(create_new_key_pair()) as client:  # the bootstrap peer has home's own dial
                        assert str(await client.connect(Multiaddr(home.addr))) == home.peer_id
                        assert _relayed_connection(client, ID.from_base58(home.peer_id))


@pytest.mark.slow
@pytest.mark.parametrize("nat", ["cone", "symmetric"])
async def test_a_listening_client_reaches_a_provider_behind_nat_directly_after_a_hole_punch(
        nat: str, weights: ModelWeights, model_dir: Path, tmp_path: Path) -> None:
    """A client listening on the public side calls a provider behind NAT through the relay, then
    the connection is upgraded (DCUtR: the provider's dial goes out through its router, whichever
    NAT kind) and the relayed one closed: the next call is exact and goes direct."""
    with _lab(1, frozenset({0}) if nat == "symmetric" else frozenset()) as lab, trio.fail_after(25):  # 12 s measured
        relay_proc = _start_in(lab, lab.public_ns, lab.relay_ip, tmp_path, "relay", model_dir, "--relay-service",
                               "--layers", "model.layers.0.*")
        async with serving(relay_proc) as relay:
            home = _start_in(lab, lab.home_ns(0), lab.home_ip(0), tmp_path, "home", model_dir, "--bootstrap", relay.addr)
            async with serving(home):
                home_id = ID.from_base58(home.peer_id)
                async with session(weights, [relay.multiaddr], min_providers=2,
                                   listen=[Multiaddr(f"/ip4/{lab.client_ip}/tcp/0")]) as client:
                    network = client.node.host.get_network()
                    x = random_operand(100, 64)
                    assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                    with trio.fail_after(10):  # idle for IDLE_S, then the punch: 1.2 s measured
                        while not client.node.direct_to(home_id) or _relayed_connection(client.node, home_id) or \
                                len(network.get_connections(home_id)) != 1:
                            await trio.sleep(0.1)
                    assert client.node.puncher is not None and client.node.puncher.upgraded == 1
                    views = {v.peer: v for v in client.stats().peers}
                    assert not views[home.peer_id].relayed  # advertised through the relay, reached directly
                    x = random_operand(100, 64)
                    assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                    assert client.stats().chunks_by_peer == {home.peer_id: 2}
                    assert client.node.direct_to(home_id) and not _relayed_connection(client.node, home_id)


# The bundled model, 3 small steps: through the relay a step moves about 95 MB (each product's mask
# words come back for the whole 2048-token block).
FINETUNE = FinetuneConfig(steps=3, seq_len=32, batch_size=2, eval_batches=1)
# The relay is a provider too (a node has a model), asking 1 per GMAC; the client pays at most 0, so
# every product is computed behind a NAT. Column chunks: a call goes to every provider it can use.
NAT_CLIENT = ClientConfig(max_price_per_gmac=0, split="columns")


def _relay(lab: NatLab, run_dir: Path) -> ProviderProcess:
    """The relay on the public bridge, on the same key and port each time it is started."""
    return _start_in(lab, lab.public_ns, lab.relay_ip, run_dir, "relay", FINETUNE.model_dir, "--relay-service",
                     "--layers", "model.layers.0.*", "--price", "1")


def _finetune_through(relay: str, ledger: Path, min_providers: int,
                      on_step: StepHook | None = None) -> tuple[FinetuneResult, ClientStats]:
    """FINETUNE as a client in this process (the public side), joining through the relay alone."""
    with SwarmClient(model_dir=FINETUNE.model_dir, bootstrap=[relay], ledger=ledger, min_providers=min_providers,
                     config=NAT_CLIENT) as client:
        return finetune(FINETUNE, fhe="remote", executor=client, progress=False, on_step=on_step), client.stats()


def _assert_same_as_clear_run(result: FinetuneResult) -> None:
    """Every product is exact, so the encrypted run's losses are the clear integer run's, bit for bit."""
    clear = finetune(FINETUNE, fhe="simulate", progress=False)
    assert result.losses == clear.losses and len(result.losses) == FINETUNE.steps
    assert result.eval_before == clear.eval_before and result.eval_after == clear.eval_after


@pytest.mark.slow
async def test_a_fine_tune_through_two_providers_behind_two_nats_equals_the_clear_run(two_homes: NatLab,
                                                                                       tmp_path: Path) -> None:
    lab = two_homes
    with trio.fail_after(75):  # 40 s measured on 2 busy cores
        async with serving(_relay(lab, tmp_path)) as relay:
            homes = [_start_in(lab, lab.home_ns(k), lab.home_ip(k), tmp_path, f"home{k}", FINETUNE.model_dir,
                               "--bootstrap", relay.addr) for k in range(2)]
            async with serving(homes[0]) as first, serving(homes[1]) as second:
                for home in (first, second):  # each found itself unreachable and reserved on the relay
                    assert home.addr == f"{relay.addr}/p2p-circuit/p2p/{home.peer_id}"
                result, stats = await trio.to_thread.run_sync(_finetune_through, relay.addr, tmp_path / "c.sqlite", 3,
                                                              abandon_on_cancel=True)
    # Both served, known only by relayed addresses; this namespace has no route to a home network
    # (NatLab), so every chunk came through the relay.
    assert set(stats.chunks_by_peer) == {first.peer_id, second.peer_id}
    assert all(stats.chunks_by_peer[p] >= 10 for p in stats.chunks_by_peer)
    views = {v.peer: v for v in stats.peers}
    assert views[first.peer_id].relayed and views[second.peer_id].relayed and not views[relay.peer_id].relayed
    _assert_same_as_clear_run(result)
    print(f"losses {result.losses}, chunks {stats.chunks_by_peer}, {stats.bytes_received / 1e6:.0f} MB received")


RELAY_DOWN_S = 8.0
"""How long the killed relay stays away: longer than the provider's adverts live (3 x 2 s)."""


@pytest.mark.slow
async def test_a_relay_killed_mid_training_comes_back_and_nothing_is_lost(lab: NatLab, tmp_path: Path) -> None:
    """The relay is SIGKILLed while step 2's products cross it, and restarted on its key and port: the
    provider reserves again, the client's failed calls are retried, and the run is the clear one."""
    stepped = trio.Event()
    token = trio.lowlevel.current_trio_token()

    def after(done: int) -> None:
        if done == 1:
            trio.from_thread.run_sync(stepped.set, trio_token=token)

    with trio.fail_after(85):  # 44 s measured on 2 busy cores
        relay = _relay(lab, tmp_path)
        async with serving(relay):
            home = _start_in(lab, lab.home_ns(0), lab.home_ip(0), tmp_path, "home", FINETUNE.model_dir,
                             "--bootstrap", relay.addr)
            async with serving(home), trio.open_nursery() as nursery:
                outcome: list[tuple[FinetuneResult, ClientStats]] = []

                async def train() -> None:
                    outcome.append(await trio.to_thread.run_sync(_finetune_through, relay.addr, tmp_path / "c.sqlite",
                                                                 2, after, abandon_on_cancel=True))

                nursery.start_soon(train)
                await stepped.wait()
                await trio.sleep(1.0)  # step 2's calls are under way
                os.kill(relay.proc.pid, signal.SIGKILL)
                assert await trio.to_thread.run_sync(relay.proc.wait) == -signal.SIGKILL
                killed_at = trio.current_time()
                assert not outcome  # still training
                # The client forgets the provider meanwhile, and must hear of it again through the
                # relay once the relay is back (`NodeHost.rejoin`).
                await trio.sleep(RELAY_DOWN_S)
                async with serving(_relay(lab, tmp_path)) as back:
                    assert back.addr == relay.addr
                    back_at = trio.current_time()
                    while not outcome:
                        await trio.sleep(0.2)
                    done_at = trio.current_time()
                    # Read while the restarted relay still runs: its own shutdown cuts the provider's
                    # connection, which may reserve once more before the relay is gone.
                    reservations = home.log.read_text().count("reserved a slot on relay")
    result, stats = outcome[0]
    assert stats.chunks_by_peer.keys() == {home.peer_id}
    assert stats.retries >= 1  # the calls cut with the relay's connections were made again
    assert reservations == 2  # on the relay, then on its restart
    _assert_same_as_clear_run(result)
    print(f"relay down {back_at - killed_at:.1f} s, training done {done_at - back_at:.1f} s after it was back; "
          f"losses {result.losses}, chunks {stats.chunks_by_peer}, retries {stats.retries}, "
          f"failures {stats.failures_by_peer}, bans {stats.bans}")
