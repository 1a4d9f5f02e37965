"""Every benchmark in one run, then one table of the ratios that decide whether the product makes sense.

Runs, side by side on this machine: the encrypted matmul against a plain one for both encryption
profiles (provider MAC/s, client ns per value, bytes per value), rlwe against Zama's GLWE backend,
training steps (plain / encrypted in-process / remote through provider processes on 127.0.0.1),
and one layer's latency through 1, 2 and 3 provider processes. ``--big`` adds a training step at
LLaMA-8B layer sizes through three provider processes. Absolute times on a shared machine are
noise; the ratios are the figures (bench/RESULTS.md records them).

    python bench/all.py            # about 10 minutes on 2 cores
    python bench/all.py --big      # + the LLaMA-8B-size step (another 15 to 30 minutes, ~16 GB)
    python bench/all.py --quick    # small shapes: a smoke run of every part
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import torch
from transformers.utils import logging as hf_logging

import backend
import swarm
import train
from common import row


def main() -> None:
    intro, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and one step each: checks every part runs")
    ap.add_argument("--big", action="store_true", help="add the training step at LLaMA-8B layer sizes (heavy)")
    ap.add_argument("--providers", type=int, default=3, help="provider processes for the remote columns")
    args = ap.parse_args()
    hf_logging.set_verbosity_error()
    started = time.monotonic()
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}")
    shape = (256, 512, 512) if args.quick else (2048, 4096, 4096)
    reps = 2 if args.quick else 3
    engine = {p: backend.bench_rlwe(*shape, reps, p) for p in ("default", "shared-mask")}
    print("\nrlwe vs zama-glwe")
    zama = backend.bench_vs_zama(2, 512, reps)

    steps, warmup = (1, 0) if args.quick else (3, 1)
    columns = [train.Column("disable", "disable"), train.Column("execute", "execute"),
               train.Column(f"swarm[{args.providers}]", "remote", providers=args.providers)]
    short = train.report("training step, 1-layer LLaMA 512/512", train.SMALL, train.CONCRETE_ML_TOKENS, columns, steps, warmup)
    long = train.report("training step, 1-layer LLaMA 512/512", train.SMALL, 2048, columns, steps, warmup)
    concrete = train.against_concrete_ml(short, long, columns[1:], 2048)

    hidden, intermediate, tokens = (256, 1024, 2048) if args.quick else (1024, 4096, 3 * 2048)
    with tempfile.TemporaryDirectory(prefix="cipherswarm-bench-") as tmp:
        scaling = swarm.measure(hidden, intermediate, tokens, args.providers, reps, Path(tmp))
    swarm.report(scaling, tokens, hidden, intermediate)

    big = None
    if args.big:
        big = train.report("training step, 1-layer LLaMA at 8B layer sizes 4096/14336", train.BIG, 2048,
                           [columns[0], columns[2]], 1, 0)

    d, s = engine["default"], engine["shared-mask"]
    remote = columns[2].label
    print(f"\nsummary ({shape[0]} x {shape[1]} x {shape[2]} for the engine rows; "
          f"{time.monotonic() - started:.0f} s in all)")
    print(row("provider encrypted / plain fp32 MAC/s, default", f"1/{1 / d['provider']:.1f}", "goal >= 1/20",
              d["provider"] >= 1 / 20))
    print(row("provider encrypted / plain fp32 MAC/s, shared-mask", f"1/{1 / s['provider']:.1f}", "goal >= 1/10",
              s["provider"] >= 1 / 10))
    for name, f in engine.items():
        print(row(f"client encrypt+decrypt+verify / plain fp32 layer, {name}", f"{f['client']:.2f}", "goal <= 0.25",
                  f["client"] <= 0.25))
        print(row(f"  client ns per value (enc / dec / verify), {name}",
                  f"{f['encrypt_ns']:.1f} / {f['decrypt_ns']:.1f} / {f['verify_ns']:.1f}"))
        print(row(f"  the same with the wire conversion, {name}", f"{f['client_wire']:.2f}", "goal <= 0.25",
                  f["client_wire"] <= 0.25))
    print(row("bytes per value in / out (default, shared-mask)",
              f"{d['in_bytes']:.0f} / {d['out_bytes']:.0f}, {s['out_bytes']:.0f}", "goal 6 / 8, 4",
              d["in_bytes"] <= 6 and d["out_bytes"] <= 8 and s["out_bytes"] <= 4))
    if zama is not None:
        print(row("rlwe / zama-glwe provider MAC/s", f"{zama:,.0f}x", "goal >= 10,000x", zama >= 10_000))
    for label in ("execute", remote):
        for name, table in (("8 tokens", short), ("2048 tokens", long)):
            t, base = table[label], table["disable"]
            print(row(f"training step {label} / disable, {name} (wall, CPU)", f"{t.wall / base.wall:.1f}x, {t.cpu / base.cpu:.1f}x"))
    print(row("training step vs Concrete ML, execute, per 8-token step (CPU)", f"{concrete['execute cpu step']:,.0f}x",
              "goal >= 100x", concrete["execute cpu step"] >= 100))
    print(row("training step vs Concrete ML, execute, per token (CPU)", f"{concrete['execute cpu token']:,.0f}x",
              "goal >= 10,000x", concrete["execute cpu token"] >= 10_000))
    if big is not None:
        t, base = big[remote], big["disable"]
        print(row(f"8B-size step {remote} / disable (wall, client CPU)", f"{t.wall / base.wall:.1f}x, {t.cpu / base.cpu:.1f}x",
                  "goal <= 5x (client CPU: providers elsewhere)", t.cpu / base.cpu <= 5))
    for k, t in scaling.swarm_s.items():
        print(row(f"one layer through {k} provider(s) on one machine", f"{t:.2f} s",
                  f"{scaling.swarm_s[1] / t:.2f}x one provider; in-process encrypted {scaling.local_s:.2f} s"))


if __name__ == "__main__":
    main()
