"""Check the swarm simulator against the real testnet, then estimate LLaMA-3-8B on 100 consumer GPUs.

1. Micro-measurements on this machine (nothing from the testnet): the provider's encrypted MAC/s as
   its start-up benchmark measures it (1 and 2 torch threads: the rate and the cores a product
   uses), the client's encrypt / decrypt / verify / wire CPU ns per value at the bundled model's
   shapes, its plaintext MAC/s and per-call overhead (one fhe="disable" and one fhe="simulate"
   step), and one in-process provider and client over real libp2p on loopback: per-request
   overhead and loopback CPU per byte, by a least-squares line over calls of three sizes.
2. The real testnet: `cipherswarm testnet --steps S --no-compare` (3 provider processes and the
   client on this machine's cores), its per-step times from the step lines and report.json.
3. The simulator on the testnet's configuration with the measured inputs: one processor-sharing
   CPU of this machine's cores shared by the client and the providers.
4. The LLaMA-3-8B / 100k tokens / 100 consumer GPUs estimate, both profiles, with its assumptions.

Steps 1 to 3 run in the encryption profile `--profile` (the testnet's client, the provider's
product and the client's crypto all in it).

    .venv/bin/python bench/simulate.py [--steps 3] [--testnet-dir DIR] [--profile shared-mask]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from cipherswarm.cli.estimate import add_arguments, estimate
from cipherswarm.fhe_backend import PlainWeights, get_backend
from cipherswarm.fhe_backend.verify import FreivaldsVerifier
from cipherswarm.node import ClientConfig, Ledger, Provider, ProviderConfig, open_host
from cipherswarm.node.client import open_session
from cipherswarm.node.client.keys import CLIENT_PROFILES, DEFAULT_PROFILE
from cipherswarm.node.provider.benchmark import measure_macs_per_second
from cipherswarm.node.sim import ClientSpec, ModelShape, ProviderSpec, Swarm, Workload, simulate
from cipherswarm.node.sim.report import render
from cipherswarm.node.weights import load_model
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, build
from cipherswarm.trainer.workload import traced_model

CORES = len(os.sched_getaffinity(0))


def cpu_wall(fn, reps: int = 5) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """Median process CPU seconds and wall seconds of `fn` (after one warm-up)."""
    fn()
    cpu, wall = [], []
    for _ in range(reps):
        c, w = time.process_time(), time.perf_counter()
        fn()
        cpu.append(time.process_time() - c)
        wall.append(time.perf_counter() - w)
    return float(np.median(cpu)), float(np.median(wall))


def measure_provider(profile: str) -> tuple[float, float]:
    """MAC/s of one product alone (torch threads as a provider process has) and the cores it uses."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    one = measure_macs_per_second(1.0, profile=profile)
    torch.set_num_threads(threads)
    alone = measure_macs_per_second(1.0, profile=profile)
    return alone, min(float(threads), max(1.0, alone / one))


def measure_client_crypto(profile: str) -> dict[str, float]:
    """Core-ns per value of encrypt (per input value), decrypt and verify (per output value), wire per byte."""
    be = get_backend("rlwe")
    q = load_model(BUNDLED_MODEL).resolve("model.layers.0.mlp.up_proj").weight.q  # type: ignore[union-attr]
    w = PlainWeights(q)
    params = be.params_for(w, 8, profile=profile)
    key = be.keygen(params, weights=w)
    x = torch.randint(-128, 128, (params.n, q.shape[0]), dtype=torch.int8)  # the quantizer's dtype
    ct = be.encrypt(key, x)
    out = be.matmul(ct, w)
    checker = FreivaldsVerifier.for_params(w, params)
    y = be.decrypt(key, out)
    n_in, n_out = x.numel(), y.numel()
    enc_cpu, enc_wall = cpu_wall(lambda: be.encrypt(key, x))
    dec_cpu, _ = cpu_wall(lambda: be.decrypt(key, out))
    ver_cpu, _ = cpu_wall(lambda: checker.check(x, y))
    wire_bytes = len(ct.to_bytes()) + len(out.to_bytes())
    wire_cpu, _ = cpu_wall(lambda: (ct.to_bytes(), type(out).from_bytes(out.to_bytes())))
    return {"encrypt_ns": 1e9 * enc_cpu / n_in, "decrypt_ns": 1e9 * dec_cpu / n_out, "verify_ns": 1e9 * ver_cpu / n_out,
            "wire_ns_per_byte": 1e9 * wire_cpu / wire_bytes, "crypto_parallelism": max(1.0, enc_cpu / enc_wall)}


def measure_client_plain(shape: ModelShape) -> dict[str, float]:
    """Plaintext MAC/s of the client (a fhe="disable" step) and its per-call overhead (a fhe="simulate" step's extra CPU)."""
    config = FinetuneConfig(steps=3, eval_batches=0)
    trainer, batches, _ = build(config)
    trainer.train(batches[:3], fhe="disable", max_steps=1, progress=False)  # warm-up
    trainer.train(batches[:3], fhe="disable", max_steps=2, progress=False)
    plain = trainer.step_records[-1]
    trainer.train(batches[:3], fhe="simulate", max_steps=3, progress=False)
    clear = trainer.step_records[-1]
    tokens = config.batch_size * config.seq_len
    work = Workload(shape, tokens=tokens, micro_batch_tokens=tokens, seq_len=config.seq_len)
    macs = work.client_macs(tokens) + work.remote_macs(tokens)
    overhead = max(0.0, clear.cpu_s - clear.cpu_encrypt_s - clear.cpu_decrypt_s - plain.cpu_s) / clear.remote_calls
    return {"plain_macs_per_s": macs / plain.cpu_s, "plain_parallelism": max(1.0, plain.cpu_s / plain.wall_s),
            "call_overhead_s": overhead}


async def _exchange_samples(provider_rate: float) -> list[tuple[float, float]]:
    """(bytes on the wire, wall seconds minus the client's crypto and the provider's compute) per call."""
    weights = load_model(BUNDLED_MODEL)
    key_pair = create_new_key_pair()
    provider = Provider(weights=weights, key_pair=key_pair, config=ProviderConfig(benchmark_s=0.2, advert_interval_s=2.0))
    samples: list[tuple[float, float]] = []
    async with open_host(key_pair) as node, trio.open_nursery() as nursery:
        await nursery.start(provider.serve, node)
        with Ledger() as ledger:
            async with open_session(weights=weights, key_pair=create_new_key_pair(), ledger=ledger,
                                    bootstrap=node.addrs()[:1], config=ClientConfig(max_chunks=1)) as client:
                for layer, features in (("model.layers.0.self_attn.q_proj", 128), ("model.layers.0.mlp.up_proj", 128),
                                        ("model.layers.0.mlp.down_proj", 384)):
                    x = torch.randint(-128, 128, (2048, features))
                    await client.matmul(layer, x)  # warm-up: keys, checker, connection
                    for _ in range(5):
                        before = client.stats()
                        t0 = time.perf_counter()
                        await client.matmul(layer, x)
                        wall = time.perf_counter() - t0
                        after = client.stats()
                        crypto = (after.encrypt_s + after.decrypt_s + after.verify_s + after.wire_s) - (
                            before.encrypt_s + before.decrypt_s + before.verify_s + before.wire_s)
                        compute = (after.macs - before.macs) / provider_rate
                        nbytes = (after.bytes_sent + after.bytes_received) - (before.bytes_sent + before.bytes_received)
                        samples.append((nbytes, wall - crypto - compute))
        nursery.cancel_scope.cancel()
    return samples


def measure_exchange(provider_rate: float) -> dict[str, float]:
    """Per-request overhead and loopback CPU per byte: a line through (bytes, remaining seconds)."""
    samples = trio.run(_exchange_samples, provider_rate)
    b = np.array([s[0] for s in samples])
    t = np.array([s[1] for s in samples])
    slope, intercept = np.polyfit(b, t, 1)
    return {"exchange_overhead_s": max(0.0, float(intercept)), "loopback_s_per_byte": max(0.0, float(slope))}


def run_testnet(steps: int, out: Path, profile: str) -> tuple[list[float], dict]:
    """The real testnet; per-step seconds from its step lines (tokens / tokens-per-second) and report.json."""
    cmd = [sys.executable, "-m", "cipherswarm.cli", "testnet", "--steps", str(steps), "--no-compare", "--out", str(out),
           "--profile", profile]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if proc.returncode:
        raise RuntimeError(f"testnet failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    rates = [float(m) for m in re.findall(r"step \d+/\d+\s+loss \S+\s+(\d+) tokens/s", proc.stdout)]
    report = json.loads((out / "report.json").read_text())
    tokens = report["tokens"] / report["steps"]
    return [tokens / r for r in rates], report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3, help="testnet steps (default 3)")
    ap.add_argument("--testnet-dir", type=Path, default=None, help="testnet output folder (default: a temporary one)")
    ap.add_argument("--profile", choices=CLIENT_PROFILES, default=DEFAULT_PROFILE,
                    help=f"encryption profile of 1-3 (default: {DEFAULT_PROFILE})")
    args = ap.parse_args()
    print(f"machine: {CORES} cores, load average {os.getloadavg()[0]:.1f}; torch {torch.__version__}")
    cfg = FinetuneConfig()  # what the testnet trains with: its accumulation, the trainer's default micro-batches in flight
    shape = traced_model(BUNDLED_MODEL, lora_r=cfg.lora_r, target_modules=cfg.target_modules,
                         n_layers_to_skip_for_backprop=cfg.n_layers_to_skip_for_backprop)

    print("\n1. micro-measurements on this machine (none from the testnet)")
    rate, par = measure_provider(args.profile)
    print(f"  provider encrypted MAC/s (its benchmark, 256x256, one block)  {rate:.3g}, using {par:.2f} cores")
    crypto = measure_client_crypto(args.profile)
    print("  client crypto at 2048 x 128 -> 384 (core-ns):  " + ", ".join(f"{k} {v:.3g}" for k, v in crypto.items()))
    plain = measure_client_plain(shape)
    print("  client plaintext (fhe=disable / simulate steps):  " + ", ".join(f"{k} {v:.3g}" for k, v in plain.items()))
    exchange = measure_exchange(rate)
    print(f"  libp2p loopback, in-process provider + client:  {1e3 * exchange['exchange_overhead_s']:.2f} ms per request, "
          f"{1e9 * exchange['loopback_s_per_byte']:.2f} core-ns per byte")

    print(f"\n2. the real testnet: cipherswarm testnet --steps {args.steps} --no-compare --profile {args.profile}")
    out = args.testnet_dir or Path(tempfile.mkdtemp(prefix="cipherswarm-sim-"))
    t0 = time.perf_counter()
    measured, report = run_testnet(args.steps, out, args.profile)
    print(f"  ran in {time.perf_counter() - t0:.0f} s; report {out / 'report.json'}: {report['seconds']} s, "
          f"{report['chunks']} chunks, {report['hedges']} hedges, {report['retries']} retries")

    print("\n3. the simulator on the testnet's configuration, with the inputs of 1.")
    client = ClientSpec(cores=CORES, **crypto, **plain, exchange_overhead_s=exchange["exchange_overhead_s"])
    providers = tuple(ProviderSpec(macs_per_s=rate, parallelism=par, price_per_gmac=10 * (i + 1), rtt_s=0.0,
                                   layers=("*.0.*", "*.1.*") if i == 2 else ()) for i in range(3))
    swarm = Swarm(client=client, providers=providers, shared_cores=CORES,
                  loopback_s_per_byte=exchange["loopback_s_per_byte"])
    tokens = cfg.batch_size * cfg.seq_len
    ga = cfg.gradient_accumulation_steps
    work = Workload(shape, tokens=args.steps * ga * tokens, micro_batch_tokens=tokens, seq_len=cfg.seq_len,
                    eval_batches=cfg.eval_batches, gradient_accumulation_steps=ga, profile=args.profile)
    sim = simulate(work, swarm)
    print(render(sim, title="  simulated testnet"))
    print("\n  predicted vs measured")
    print(f"  {'':<22}{'predicted':>12}{'measured':>12}{'error':>9}")
    rows = [(f"step {i + 1}", p, m) for i, (p, m) in enumerate(zip(sim.step_s, measured))]
    rows.append(("total (with eval)", sim.wall_s, float(report["seconds"])))
    rows.append(("bytes sent (steps)", sim.tally.bytes_up, float(report["bytes_sent"])))
    for name, p, m in rows:
        unit = "MB" if "bytes" in name else "s"
        k = 1e6 if unit == "MB" else 1.0
        print(f"  {name:<22}{p / k:>10.2f} {unit}{m / k:>10.2f} {unit}{100 * (p - m) / m:>+8.1f}%")
    print("  (bytes sent: the simulation counts eval too; report.json's bytes are the training steps')")

    print("\n4. LLaMA-3-8B, 100k tokens, 100 consumer GPUs on home links (assumptions, no GPU measured here)")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    slow = ["--timeout-min-s", "120", "--request-ttl-s", "120", "--hedge-min-s", "120", "--max-payload-mb", "256"]
    scenarios = [
        ("home client 50/300 Mbit/s (2-block micro-batches, 2 chunks per call so that a call's upload fits the 120 s request TTL)",
         slow + ["--micro-batch-tokens", "4096", "--max-chunks", "2"]),
        ("client on 1 Gbit/s symmetric fibre (5 micro-batches of 20,000 tokens: 10 blocks, 10 block chunks per call)",
         ["--max-payload-mb", "256", "--micro-batch-tokens", "20000", "--max-chunks", "10",
          "--client-up-mbit", "1000", "--client-down-mbit", "1000"]),
    ]
    for profile in ("default", "shared-mask"):
        for title, flags in scenarios:
            est = estimate(parser.parse_args(flags + ["--profile", profile]))
            print()
            print(render(est, title=f"  [{profile}] {title}"))
            goal = est.wall_s <= 7 * 3600
            print(f"  goal <= 7 h (Concrete ML: ~70 h): {est.wall_s / 3600:.1f} h  {'met' if goal else 'NOT met'}; "
                  f"limited by {est.bottleneck}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
