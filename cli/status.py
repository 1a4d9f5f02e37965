"""Show the providers a client finds: their offers, measured figures, reputation and bans.

Joins the swarm through --bootstrap for a few seconds as a client would (gossiped adverts, DHT
lookups of the model's providers with --model), then prints one row per provider: its advert,
and the record this client's ledger holds of it (measured rate and latency, reputation, failures,
permanent bans of cheaters; --unban lifts one).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import trio

from cipherswarm.cli.bits import add_weight_bits


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bootstrap", nargs="*", default=[], metavar="MULTIADDR", help="peers to join the swarm through")
    p.add_argument("--model", type=Path, default=None,
                   help="look up this model's providers in the DHT too (a folder or .gguf file)")
    add_weight_bits(p, "the providers looked up serve this width (it is part of the model hash)")
    p.add_argument("--ledger", type=Path, default=None, help="client ledger (default: ~/.cipherswarm/client.sqlite)")
    p.add_argument("--wait", type=float, default=3.0, help="seconds to listen for adverts")
    p.add_argument("--unban", nargs="*", default=[], metavar="PEER", help="lift the bans of these peer ids first")


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


async def _status(args: argparse.Namespace) -> int:
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.kad_dht.kad_dht import DHTMode
    from libp2p.peer.id import ID
    from multiaddr import Multiaddr

    from cipherswarm.node import Ledger, load_model
    from cipherswarm.node.gguf import model_dir
    from cipherswarm.node.client.peers import PeerTable
    from cipherswarm.node.discovery import AdvertWatcher
    from cipherswarm.node.host import open_host
    from cipherswarm.node.identity import home_dir

    model_hash = None if args.model is None else load_model(model_dir(args.model), hold=False, weight_bits=args.weight_bits).model_hash
    with Ledger(args.ledger or home_dir() / "client.sqlite") as ledger:
        table = PeerTable(ledger=ledger)
        for peer in args.unban:
            print(f"{peer}: {'unbanned' if table.forgive(ID.from_base58(peer)) else 'was not banned'}", file=sys.stderr)
        bootstrap = [Multiaddr(a) for a in args.bootstrap]
        async with open_host(create_new_key_pair(), dht_mode=DHTMode.CLIENT, bootstrap=bootstrap) as node:
            watcher = AdvertWatcher(node, model_hash, table.update)
            with trio.move_on_after(args.wait):
                await watcher.run()
        rows = [["peer", "device", "layers", "MAC/s adv.", "MAC/s meas.", "latency", "price/GMAC", "free",
                 "reputation", "failures", "banned", "path"]]
        for v in table.views():
            rows.append([
                v.peer, v.device, "all" if v.layers is None else str(v.layers), f"{v.macs_per_second:.3g}",
                f"{v.measured_macs_per_second:.3g}", f"{1000 * v.latency_s:.0f} ms", str(v.price_per_gmac),
                str(v.free_slots), f"{v.reputation:.2f}", str(v.failures), v.banned or "-",
                "relayed" if v.relayed else "direct",
            ])
        print(_table(rows))
        listed = {v.peer for v in table.views()}
        for peer, reason in table.bans().items():
            if peer not in listed:
                print(f"banned, not seen now: {peer}: {reason}")
        print(f"{len(table)} provider(s)", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from cipherswarm.node.logs import configure_logging

    configure_logging("WARNING")
    return trio.run(_status, args)
