"""What durable receipts cost: one ledger row written with synchronous=FULL (an fsync of the WAL per
receipt or ban) beside one written with synchronous=NORMAL (track records), side by side on the same
file system, per row and against the chunk it records.

    .venv/bin/python bench/ledger.py                 # 200 rows of each, in a temporary folder
    .venv/bin/python bench/ledger.py --dir /path     # on another file system (the client's home)
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from libp2p.crypto.ed25519 import create_new_key_pair

from cipherswarm.node.identity import peer_id_of, signing_key
from cipherswarm.node.ledger import Ledger, TrackRecord
from cipherswarm.protocol import UsageReceipt, countersign_receipt, sign_receipt


def receipts(n: int) -> list:
    """n countersigned receipts of distinct requests, signed with fresh keys."""
    provider, client = create_new_key_pair(), create_new_key_pair()
    out = []
    for _ in range(n):
        receipt = UsageReceipt(provider=peer_id_of(provider).to_bytes(), client=peer_id_of(client).to_bytes(), request_id=os.urandom(16),
                               request_digest=os.urandom(32), reply_digest=os.urandom(32), macs=2048 * 4096 * 4096,
                               price_per_gmac=5, completed_at_ms=int(time.time() * 1000))
        out.append(countersign_receipt(sign_receipt(receipt, signing_key(provider)), signing_key(client)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=200, help="rows of each kind (default 200)")
    p.add_argument("--dir", type=Path, default=None, help="folder of the ledger file (default: a temporary one)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp, Ledger(Path(tmp) / "ledger.sqlite") as ledger:
        assert ledger.synchronous() == 2  # FULL for receipts and bans
        signed = receipts(args.rows)
        full, normal = [], []
        for i, r in enumerate(signed):  # interleaved, so that both see the same disk
            t0 = time.perf_counter()
            ledger.record(r, layer="model.layers.0.mlp.up_proj")
            full.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            ledger.save_record(f"peer{i % 8}", TrackRecord(i, 0, 0.05, 1e11))
            normal.append(time.perf_counter() - t0)
        assert ledger.synchronous() == 2 and len(ledger.receipts()) == args.rows
    f, n = statistics.median(full), statistics.median(normal)
    print(f"ledger rows on {args.dir or tempfile.gettempdir()}, median of {args.rows} each:")
    print(f"  receipt, synchronous=FULL      {f * 1e3:8.3f} ms")
    print(f"  track record, synchronous=NORMAL {n * 1e3:6.3f} ms")
    print(f"  FULL / NORMAL                  {f / n:8.1f}x")
    print(f"  per 1000 receipts (chunks)      {1000 * f:8.2f} s of fsync")


if __name__ == "__main__":
    main()
