"""What the client's preference pays: the same fine-tune on the real testnet with --prefer price,
speed and balanced, side by side.

Each preference runs `cipherswarm testnet --no-compare` (three provider processes on 127.0.0.1 at
10, 20 and 30 per GMAC, the last holding two blocks; the bundled tiny model; fresh identities and
ledger per run), and the figures come from the client's ledger, every countersigned receipt
verified again: price paid per 1k training tokens (held-out evaluations included, as a run pays
them; each receipt rounds its amount up to a whole unit, so the list price, MACs x price, is shown
beside it) and each provider's share of the chunks. Target: `price` pays at least 30% less per 1k
tokens than `speed`.

Two micro-batches of each step run at once by default (`--accumulation 2`, the testnet's
`--in-flight 2`), so that calls overlap and the router chooses among providers that are busy; with
one micro-batch a step, every call is one chunk and the next starts when it ends, and each
preference sends nearly every chunk to whichever provider measured fastest.

    .venv/bin/python bench/market.py --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from libp2p.peer.id import ID

from cipherswarm.node.ledger import Ledger, verify_countersigned

PREFERENCES = ("price", "speed", "balanced")
TARGET_SAVING = 0.30  # `price` against `speed`, per 1k tokens


def run_testnet(prefer: str, out: Path, steps: int, accumulation: int, timeout_s: float) -> dict:
    """One testnet fine-tune with `--prefer prefer` into `out`; its report.json with the wall time."""
    out.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "cipherswarm.cli", "testnet", "--steps", str(steps), "--no-compare",
           "--accumulation", str(accumulation), "--prefer", prefer, "--out", str(out)]
    start = time.perf_counter()
    with open(out / "testnet.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"testnet --prefer {prefer} failed ({proc.returncode}):\n"
                         + (out / "testnet.log").read_text(errors="replace")[-3000:])
    report = json.loads((out / "report.json").read_text())
    report["wall_s"] = time.perf_counter() - start
    return report


def receipts_by_provider(ledger_path: Path) -> tuple[Counter[str], int, float, int]:
    """Chunks per provider (base58), the amount paid, the same at list price (MACs x price, not
    rounded per receipt) and the MACs bought, from the client's ledger: each receipt's signatures
    verified, so the figures are what the providers signed for."""
    chunks: Counter[str] = Counter()
    paid = macs = 0
    listed = 0.0
    with Ledger(ledger_path, read_only=True) as ledger:
        for signed in ledger.receipts():
            receipt = verify_countersigned(signed)
            chunks[ID(receipt.provider).to_base58()] += 1
            paid += receipt.amount
            listed += receipt.macs * receipt.price_per_gmac / 1e9
            macs += receipt.macs
    return chunks, paid, listed, macs


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3, help="optimizer steps of each fine-tune (default 3)")
    p.add_argument("--out", type=Path, default=Path("runs/market"), help="folder of the runs (default runs/market)")
    p.add_argument("--accumulation", type=int, default=2, help="micro-batches per step, run at once (default 2)")
    p.add_argument("--prefer", nargs="+", choices=PREFERENCES, default=list(PREFERENCES), help="preferences to run")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds each testnet may take")
    args = p.parse_args()

    rows = {}
    for prefer in args.prefer:
        print(f"testnet --prefer {prefer} --steps {args.steps} ...", flush=True)
        out = args.out / prefer
        report = run_testnet(prefer, out, args.steps, args.accumulation, args.timeout)
        chunks, paid, listed, macs = receipts_by_provider(out / "swarm" / "ledger.sqlite")
        providers = report["providers"]
        rows[prefer] = {
            "tokens": report["tokens"], "paid": paid, "per_1k": 1000 * paid / report["tokens"],
            "listed_per_1k": 1000 * listed / report["tokens"], "per_gmac": listed / (macs / 1e9) if macs else 0.0,
            "chunks": sum(chunks.values()), "wall_s": report["wall_s"],
            "share": [chunks[q["peer"]] / max(1, sum(chunks.values())) for q in providers],
            "prices": [q["price_per_gmac"] for q in providers],
        }

    prices = next(iter(rows.values()))["prices"]
    heads = "  ".join(f"p{i} ({price}/GMAC)" for i, price in enumerate(prices))
    print(f"\n{'prefer':<10} {'tokens':>7} {'paid':>7} {'per 1k tokens':>14} {'at list price':>14} {'per GMAC':>9} "
          f"{'chunks':>7}  chunk share: {heads}  {'wall s':>7}")
    for prefer, r in rows.items():
        share = "  ".join(f"{s:>{len(f'p{i} ({price}/GMAC)')}.0%}" for i, (s, price) in enumerate(zip(r["share"], prices)))
        print(f"{prefer:<10} {r['tokens']:>7} {r['paid']:>7,} {r['per_1k']:>14.1f} {r['listed_per_1k']:>14.1f} "
              f"{r['per_gmac']:>9.2f} {r['chunks']:>7}               {share}  {r['wall_s']:>7.0f}")
    if "price" in rows and "speed" in rows:
        saving = 1 - rows["price"]["per_1k"] / rows["speed"]["per_1k"]
        listed = 1 - rows["price"]["listed_per_1k"] / rows["speed"]["listed_per_1k"]
        met = saving >= TARGET_SAVING
        print(f"\n--prefer price pays {saving:.1%} less per 1k tokens than --prefer speed, {listed:.1%} less at list "
              f"price (target >= {TARGET_SAVING:.0%}: {'met' if met else 'NOT met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
