"""Bytes per training token through the client's link, by micro-batch size.

For each micro-batch size, one training micro-batch's remote products (every call forward and, past
the skipped ones, backward, from `node/sim/workload.py`: one per group of layers reading the same
input, with each group's real parameters) and the
ciphertext words they move, per token: as the wire carries them now (a ring block's padding tokens
send no B word and receive only their A'' word, `fhe_backend/ciphertext.py`) beside every slot of
every block travelling, as before. The wire sizes are `Params.payload_bytes` / `result_bytes`,
which `tests/fhe_backend/test_rlwe.py` holds to the serialised lengths. Each encryption profile
that a swarm client can use (exact `default`, approximate `compact`, exact `shared-mask`, whose
replies carry no mask product) gets its table, and each its bytes against the default's at the
same size.

    .venv/bin/python bench/bytes.py                      # LLaMA-3-8B widths
    .venv/bin/python bench/bytes.py --model tiny         # the bundled model
"""

from __future__ import annotations

import argparse

from cipherswarm.cli.estimate import load_model
from cipherswarm.fhe_backend.params import wire_bytes
from cipherswarm.node.client.keys import CLIENT_PROFILES
from cipherswarm.node.sim import Workload

SIZES = (64, 256, 1024, 2048, 4096, 8192)


def per_token(work: Workload, tokens: int) -> tuple[float, float, float]:
    """(sent now, received now, sent + received with every slot travelling) per token."""
    products = work.products(tokens)
    up = sum(p.bytes_in for p in products)
    down = sum(p.bytes_out for p in products)
    padded = sum(wire_bytes(p.padded_tokens, p.params.n, p.contraction, p.params.in_bytes)
                 + wire_bytes(p.padded_tokens, p.params.n, p.width, p.params.out_bytes) for p in products)
    return up / tokens, down / tokens, padded / tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-3-8b", help="llama-3-8b, tiny, or a HF model directory (default llama-3-8b)")
    args = p.parse_args()
    shape = load_model(args.model)
    totals: dict[str, dict[int, float]] = {}
    for profile in CLIENT_PROFILES:
        work = Workload(shape, tokens=max(SIZES), micro_batch_tokens=max(SIZES), seq_len=64, profile=profile)
        n = max(q.params.n for q in work.products(max(SIZES)))
        print(f"{args.model}: one training micro-batch, default precision, {profile} profile, ring blocks of N = {n} tokens (largest)")
        rows = {t: per_token(work, t) for t in SIZES}
        full = sum(rows[n][:2]) if n in rows else min(sum(r[:2]) for r in rows.values())
        totals[profile] = {t: up + down for t, (up, down, _) in rows.items()}
        base = totals[CLIENT_PROFILES[0]]
        print(f"  {'tokens':>7}  {'up KB/tok':>10}  {'down KB/tok':>11}  {'total':>9}  {'vs a full block':>15}  "
              f"{'every slot sent':>15}  {'saved':>6}  {'vs ' + CLIENT_PROFILES[0]:>10}")
        for t, (up, down, padded) in rows.items():
            total = up + down
            print(f"  {t:>7}  {up / 1e3:>10.1f}  {down / 1e3:>11.1f}  {total / 1e3:>9.1f}  {total / full:>14.2f}x  "
                  f"{padded / 1e3:>15.1f}  {1 - total / padded:>6.1%}  {total / base[t] - 1:>+10.1%}")


if __name__ == "__main__":
    main()
