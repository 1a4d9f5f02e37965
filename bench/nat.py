"""One encrypted layer product from a provider behind NAT through a circuit relay, beside the same
product from a directly reachable provider, in one run (root: it builds network namespaces).

The lab (node/nat/netns.py): this process (the client) and a relay on a "public" bridge; the relay is
a `cipherswarm provider --relay-service` holding another layer than the one timed. Phase 1 times
the call through a provider on the public bridge (direct); phase 2 through a provider in a home
network behind a MASQUERADE router, started with `--relay` (relayed: every byte crosses the relay
process, which copies it between two yamux streams in Python). Same model, same machine, same
client code; a fresh client per phase. Last, probes of hole punching for each NAT kind the lab
emulates (PUNCH_CASES): plain nodes (this script with --dcutr-node) as relay, NATed node and a
client listening on its own network, which dials the NATed node through the relay and waits for
its hole puncher (node/nat/punch.py) to make the connection direct; the time is from the relayed
connection to the direct one, the relayed connection's idle wait included.

    sudo .venv/bin/python bench/nat.py                     # up_proj, hidden 512 / intermediate 1024, 2048 tokens
    sudo .venv/bin/python bench/nat.py --tokens 512 --reps 5
    sudo .venv/bin/python bench/nat.py --punch-only        # only the hole-punching probes
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from cipherswarm.cli.localswarm import ProviderProcess, start_provider
from cipherswarm.node import ClientConfig, SwarmClient
from cipherswarm.node.nat.netns import LabUnavailable, NatLab
from cipherswarm.node.weights import load_model

from common import random_llama, row, timed

LAYER = "model.layers.0.mlp.up_proj"
START_S = 300.0


@contextmanager
def serving(lab: NatLab, namespace: str, ip: str, run_dir: Path, name: str, model_dir: Path,
            *args: str, port: int = 4001) -> Iterator[ProviderProcess]:
    process = start_provider(0, model=model_dir, run_dir=run_dir, name=name, listen=f"/ip4/{ip}/tcp/{port}",
                             prefix=lab.exec_prefix(namespace), price=0, benchmark_s=0.2, extra_args=args,
                             env={"OMP_NUM_THREADS": "1"})
    try:
        process.wait_addr(START_S)
        yield process
    finally:
        process.stop()


def measure(lab: NatLab, model_dir: Path, run_dir: Path, x: torch.Tensor, expected: torch.Tensor,
            reps: int) -> dict[str, tuple[float, int]]:
    """Median seconds of one call and the bytes it moved, per path."""
    out: dict[str, tuple[float, int]] = {}
    with serving(lab, lab.public_ns, lab.relay_ip, run_dir, "relay", model_dir, "--relay-service",
                 "--layers", "model.layers.0.self_attn.*") as relay:
        for path in ("direct", "relayed"):
            if path == "direct":
                place = (lab.public_ns, lab.relay_ip, "--bootstrap", relay.addr)
            else:
                place = (lab.home_ns(0), lab.home_ip(0), "--relay", relay.addr, "--bootstrap", relay.addr)
            namespace, ip, *flags = place
            with serving(lab, namespace, ip, run_dir, path, model_dir, *flags,
                         port=4002 if path == "direct" else 4001) as provider:
                assert ("p2p-circuit" in provider.addr) == (path == "relayed"), provider.addr
                with SwarmClient(model_dir=model_dir, bootstrap=[relay.addr], ledger=run_dir / f"{path}.sqlite",
                                 min_providers=2, config=ClientConfig(wait_providers_s=60.0)) as client:
                    seconds, y = timed(lambda: client.matmul(LAYER, x), reps=reps)
                    if not torch.equal(y, expected):
                        raise SystemExit(f"the {path} product is not exact")
                    stats = client.stats()
                    if set(stats.chunks_by_peer) != {provider.peer_id}:
                        raise SystemExit(f"the {path} calls went to {stats.chunks_by_peer}, not only {provider.peer_id}")
                    view = {v.peer: v for v in stats.peers}[provider.peer_id]
                    if view.relayed != (path == "relayed"):
                        raise SystemExit(f"the client sees the {path} provider as relayed={view.relayed}")
                    moved = (stats.bytes_sent + stats.bytes_received) // (reps + 1)
                out[path] = (seconds, moved)
    return out


async def dcutr_node(role: str, listen: str, target: str | None, relay: str | None) -> None:
    """One node of the hole-punching probe (run inside a namespace by `dcutr_probe`): a relay, the
    NATed node (reserving on `target`, the relay), or the client (dialing `target`, the NATed node's
    relayed address, then waiting for its hole puncher to make the connection direct). Prints its
    address, and the client its verdict."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from multiaddr import Multiaddr

    from cipherswarm.node import open_host
    from cipherswarm.node.nat import RelayServiceConfig

    async with open_host(create_new_key_pair(), listen=[Multiaddr(listen)],
                         bootstrap=[Multiaddr(relay)] if relay else (),
                         relay_service=RelayServiceConfig() if role == "relay" else None,
                         relay=[Multiaddr(target)] if role == "home" and target else None) as node:
        print(node.addrs()[0], flush=True)
        if role != "client" or target is None:
            await trio.sleep_forever()
        peer = await node.connect(Multiaddr(target))
        start = trio.current_time()
        with trio.move_on_after(PUNCH_WAIT_S):
            while not node.direct_to(peer):
                await trio.sleep(0.05)
        took = trio.current_time() - start
        conns = node.host.get_network().get_connections(peer)
        paths = [str(a) for c in conns for a in c.get_transport_addresses()]
        verdict = f"direct after {took:.2f} s" if node.direct_to(peer) else f"still relayed after {took:.0f} s"
        print(f"dcutr: {verdict}; connections: {paths}", flush=True)


PUNCH_WAIT_S = 30.0
"""How long the probe's client waits for a direct connection (the puncher's 3 rounds take 21 s)."""


PUNCH_CASES = (  # (NATed node's home, client's home or None for the public bridge)
    (0, None),  # cone NAT, client public
    (0, 1),  # cone NAT on both sides: simultaneous open
    (2, None),  # symmetric NAT, client public
    (2, 1),  # symmetric NAT on one side, cone on the other
)
"""The hole-punching cases `dcutr_probe` tries, in a lab with homes 0 and 1 cone, 2 symmetric."""


def nat_kind(lab: NatLab, home: int | None) -> str:
    return "public" if home is None else ("symmetric" if home in lab.symmetric else "cone") + " NAT"


def dcutr_probe(lab: NatLab, node_home: int, client_home: int | None, port: int) -> str:
    """Relay on the public bridge, a NATed node at `node_home` reserving on it, and a client at
    `client_home` (None: on the public bridge) dialing the node's relayed address, then asking
    DCUtR for a direct connection; the client's verdict line."""
    import subprocess
    import sys

    me = [sys.executable, str(Path(__file__).resolve()), "--dcutr-node"]
    procs: list[subprocess.Popen[str]] = []
    try:
        relay = subprocess.Popen(lab.exec_prefix(lab.public_ns) + me + ["relay", f"/ip4/{lab.relay_ip}/tcp/{port}"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(relay)
        relay_addr = relay.stdout.readline().strip()  # type: ignore[union-attr]
        home = subprocess.Popen(lab.exec_prefix(lab.home_ns(node_home)) + me + [
            "home", f"/ip4/{lab.home_ip(node_home)}/tcp/{port}", relay_addr],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        procs.append(home)
        home_addr = home.stdout.readline().strip()  # type: ignore[union-attr]
        where = [] if client_home is None else lab.exec_prefix(lab.home_ns(client_home))
        ip = lab.client_ip if client_home is None else lab.home_ip(client_home)
        client = subprocess.run(where + me + ["client", f"/ip4/{ip}/tcp/{port}", home_addr, relay_addr],
                                capture_output=True, text=True, timeout=90)
        lines = client.stdout.strip().splitlines()
        return lines[-1] if lines and lines[-1].startswith("dcutr:") else f"dcutr: probe failed: {client.stderr[-300:]}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()


def main() -> None:
    intro, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=2048, help="tokens of the call (2048 per ring block)")
    ap.add_argument("--reps", type=int, default=3, help="timed calls per path (median)")
    ap.add_argument("--punch-only", action="store_true", help="only the hole-punching probes")
    ap.add_argument("--dcutr-node", nargs="+", metavar="ARG", help=argparse.SUPPRESS)  # dcutr_probe's processes
    args = ap.parse_args()
    if args.dcutr_node:
        import trio

        role, listen, *target = args.dcutr_node
        trio.run(dcutr_node, role, listen, target[0] if target else None, target[1] if len(target) > 1 else None)
        return
    print(f"{os.cpu_count()} CPUs, torch {torch.__version__}; every process on this machine, in its own namespace")
    with tempfile.TemporaryDirectory(prefix="cipherswarm-bench-nat-") as tmp:
        run_dir = Path(tmp)
        model_dir = run_dir / "model"
        random_llama(dict(hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=8,
                          num_key_value_heads=8, vocab_size=512)).save_pretrained(model_dir, safe_serialization=True)
        q = load_model(model_dir).resolve(LAYER).weight.q
        x = torch.randint(-128, 128, (args.tokens, q.shape[0]), generator=torch.Generator().manual_seed(1))
        expected = x @ q.long()
        try:
            lab = NatLab(homes=3, symmetric=frozenset({2})).open()
        except LabUnavailable as exc:
            raise SystemExit(f"bench/nat.py: {exc}") from None
        try:
            out = measure(lab, model_dir, run_dir, x, expected, args.reps) if not args.punch_only else None
            punched = [(node, client, dcutr_probe(lab, node, client, 4101 + i)) for i, (node, client) in
                       enumerate(PUNCH_CASES)]
        finally:
            lab.close()
    if out is not None:
        report(out, args)
    print("\nhole punching (DCUtR) of a relayed connection (node/nat/netns.py's NAT kinds):")
    for node, client, verdict in punched:
        print(f"  node behind {nat_kind(lab, node)}, client {'on the public bridge' if client is None else 'behind ' + nat_kind(lab, client)}:"
              f"\n    {verdict}")


def report(out: dict[str, tuple[float, int]], args: argparse.Namespace) -> None:
    """The relayed-vs-direct lines."""
    (direct_s, moved), (relayed_s, _) = out["direct"], out["relayed"]
    print(f"\none layer call {args.tokens} x {args.hidden} x {args.intermediate} ({LAYER}), 8-bit activations, "
          f"{moved / 1e6:.1f} MB through the client's link per call, median of {args.reps}")
    print(row("direct (provider on the public network)", f"{direct_s * 1e3:.0f} ms", f"{moved / direct_s / 1e6:.1f} MB/s"))
    print(row("relayed (provider behind NAT, circuit relay v2)", f"{relayed_s * 1e3:.0f} ms",
              f"{moved / relayed_s / 1e6:.1f} MB/s; {direct_s / relayed_s:.2f}x the direct throughput"))


if __name__ == "__main__":
    main()
