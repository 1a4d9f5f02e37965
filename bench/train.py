"""Seconds per LoRA training step: plain float against encrypted base layers, side by side in one run.

(a) a 1-layer random LLaMA, hidden = intermediate = 512, 8 heads, vocab 512, LoRA r=4 on q_proj and
    v_proj, n_layers_to_skip_for_backprop=3, n_bits=8, shifted cross-entropy, one sequence per step:
    8 tokens (Concrete ML 1.9's LoraTrainer: 290.6 s per step with fhe="execute" on this CPU), then
    2048 tokens (a full ring block) for the cost per token.
(b) --big: the same with LLaMA-8B layer sizes (hidden 4096, intermediate 14336, 32 heads, 8 KV heads)
    and 2048-token micro-batches. Heavy: minutes per step and ~8 GB of memory.

Columns: disable (plain float); execute[profile] (encrypt, in-process provider, decrypt, Freivalds
check); fhe="remote" as loopback[profile] - an in-process provider that sees only ciphertext bytes
and public weights, so what it adds over execute is serialisation - as swarm[N] with ``--swarm N``:
the node client and N ``cipherswarm provider`` processes on 127.0.0.1 serving a saved copy of the
model (every process shares this machine's cores) - or, with ``--remote-executor
pkg.module:factory``, as ``factory(layer_specs)``.
Wall times on a shared, busy machine swing with the load; CPU times (client plus in-process
provider) barely move and bound the wall time of an idle machine, so both are printed.

    python bench/train.py                 # (a), a few minutes on 2 cores
    python bench/train.py --big           # (a) and (b)
    python bench/train.py --big --swarm 3 --no-remote --profiles default   # (b) over 3 provider processes
"""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import statistics
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers.utils import logging as hf_logging  # noqa: E402

from cipherswarm.trainer import LayerSpec, LocalExecutor, LoraTrainer, MatmulExecutor, StepRecord, causal_lm_loss  # noqa: E402

from common import LoopbackSwarm, random_llama, row  # noqa: E402

CONCRETE_ML_EXECUTE_S = 290.6  # Concrete ML 1.9 LoraTrainer, fhe="execute", config (a), 8 tokens, this CPU
CONCRETE_ML_TOKENS = 8
GOAL_STEP, GOAL_TOKEN = 100.0, 10_000.0

SMALL = dict(hidden_size=512, intermediate_size=512, num_attention_heads=8, num_key_value_heads=8, vocab_size=512)
BIG = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, vocab_size=512)

ExecutorFactory = Callable[[dict[str, LayerSpec]], MatmulExecutor]


@dataclass(frozen=True)
class Column:
    """One way of running the same training step."""

    label: str
    fhe: str
    profile: str = "default"  # encryption profile of the local executors
    factory: ExecutorFactory | None = None  # builds the executor of fhe="remote"
    providers: int = 0  # > 0: fhe="remote" through this many provider processes on loopback


def loopback(profile: str) -> ExecutorFactory:
    """The in-process "remote": ciphertexts cross to a weights-only provider as bytes."""
    return lambda specs: LocalExecutor(specs, profile=profile, wire=True)


def load_factory(spec: str) -> ExecutorFactory:
    """The callable named by ``pkg.module:factory``."""
    module, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"--remote-executor must look like pkg.module:factory, got {spec!r}")
    return getattr(importlib.import_module(module), attr)


def measure(sizes: dict, tokens: int, col: Column, steps: int, warmup: int) -> list[StepRecord]:
    """Step records of ``steps`` timed steps (after ``warmup``) of a fresh trainer run as ``col``."""
    with ExitStack() as stack:
        base = random_llama(sizes)
        swarm = None
        if col.providers:  # the providers load a saved copy of the base weights the client trains
            run_dir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="cipherswarm-bench-")))
            base.save_pretrained(run_dir / "model", safe_serialization=True)
            swarm = stack.enter_context(LoopbackSwarm(run_dir / "model", run_dir / "swarm"))
            for _ in range(col.providers):
                swarm.add()
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        trainer = LoraTrainer(model=model, optimizer=opt, loss_fn=causal_lm_loss, n_layers_to_skip_for_backprop=3,
                              train_log_path=None)
        data = torch.randint(0, sizes["vocab_size"], (warmup + steps, tokens), generator=torch.Generator().manual_seed(1))
        executor = None
        if col.fhe != "disable":
            trainer.compile(data[:1], n_bits=8, profile=col.profile)
            if swarm is not None:
                executor = stack.enter_context(swarm.client())
            elif col.factory is not None:
                executor = col.factory(trainer.layer_specs())
        trainer.train(torch.utils.data.DataLoader(data, batch_size=1), fhe=col.fhe, executor=executor, progress=False)
        return list(trainer.step_records[warmup:])


@dataclass(frozen=True)
class Timing:
    """Median seconds per step of one column: wall clock, and CPU of the client plus any in-process provider.

    With nothing to wait for, a step's wall time on an idle machine is at most its CPU time (some
    thread is always running), so ``cpu`` bounds what an idle machine would show; on a shared,
    busy machine wall times swing with the load while CPU times barely move.
    """

    wall: float
    cpu: float


def report(title: str, sizes: dict, tokens: int, columns: list[Column], steps: int, warmup: int) -> dict[str, Timing]:
    """Print one table of seconds per step; return them by column label."""
    print(f"\n{title}: {tokens} tokens per step, {steps} timed step(s) after {warmup} warm-up "
          f"(load average {os.getloadavg()[0]:.1f})")
    per_step: dict[str, Timing] = {}
    med = statistics.median
    width = max(len(c.label) for c in columns) + 2
    for col in columns:
        records = measure(sizes, tokens, col, steps, warmup)
        t = per_step[col.label] = Timing(med(r.wall_s for r in records), med(r.cpu_s + r.provider_s for r in records))
        detail = f"{t.wall:8.3f} s/step wall {t.cpu:8.3f} s CPU"
        if col.fhe != "disable":
            crypto = med(r.cpu_encrypt_s + r.cpu_decrypt_s + r.cpu_verify_s + r.cpu_wire_s for r in records)
            detail += (f"  | client: crypto {crypto:.2f} s, plaintext {med(r.cpu_plain_s for r in records):.2f} s;"
                       f" provider {med(r.provider_s for r in records):.2f} s;"
                       f" {med(r.remote_calls for r in records):.0f} products,"
                       f" {med(r.bytes_sent for r in records) / 1e6:.1f} MB out, {med(r.bytes_received for r in records) / 1e6:.1f} MB back")
        print(f"  {col.label:<{width}}{detail}")
        if col.providers:  # a node client names every part of its CPU (StepRecord's docstring)
            parts = {k: med((r.cpu_parts or {}).get(k, 0.0) for r in records) for k in records[0].cpu_parts or {}}
            print(f"  {'':<{width}}client CPU parts (s): " + ", ".join(
                f"{k} {v:.2f}" for k, v in sorted(parts.items(), key=lambda kv: -kv[1])) +
                f"; unnamed {med(r.cpu_unnamed_s for r in records):.2f}")
    base = per_step[columns[0].label]
    for col in columns[1:]:
        t = per_step[col.label]
        cpu = "client CPU" if col.providers else "CPU"  # provider processes' CPU is not the client's
        print(row(f"{col.label} / {columns[0].label} (wall, {cpu})", f"{t.wall / base.wall:.1f}x, {t.cpu / base.cpu:.1f}x"))
    return per_step


def main() -> None:
    intro, _, rest = __doc__.partition("\n\n")
    parser = argparse.ArgumentParser(description=intro, epilog=rest, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per column (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first (kernel compilation, caches)")
    parser.add_argument("--long-tokens", type=int, default=2048, help="tokens of the per-token micro-batch")
    parser.add_argument("--profiles", default="default,shared-mask",
                        help="comma-separated encryption profiles for execute and the loopback remote")
    parser.add_argument("--big", action="store_true", help="also run (b), LLaMA-8B layer sizes (heavy; default profile)")
    parser.add_argument("--big-steps", type=int, default=1, help="timed steps per column of (b)")
    parser.add_argument("--remote-executor", metavar="MODULE:FACTORY",
                        help="factory(layer_specs) -> executor for fhe='remote' (default: in-process bytes loopback)")
    parser.add_argument("--swarm", type=int, default=0, metavar="N",
                        help="add a remote column through N provider processes on 127.0.0.1 (default profile)")
    parser.add_argument("--no-remote", action="store_true", help="skip the in-process loopback columns")
    parser.add_argument("--threads", type=int, help="torch and crypto threads (default: all cores)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        os.environ["CIPHERSWARM_THREADS"] = str(args.threads)
    hf_logging.set_verbosity_error()
    profiles = [p for p in args.profiles.split(",") if p]
    columns = [Column("disable", "disable")] + [Column(f"execute[{p}]", "execute", p) for p in profiles]
    if args.remote_executor:
        columns.append(Column("remote", "remote", factory=load_factory(args.remote_executor)))
    elif not args.no_remote:
        columns += [Column(f"loopback[{p}]", "remote", p, loopback(p)) for p in profiles]
    if args.swarm:
        columns.append(Column(f"swarm[{args.swarm}]", "remote", providers=args.swarm))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"{platform.processor() or platform.machine()}")

    short = report("(a) 1-layer LLaMA 512/512", SMALL, CONCRETE_ML_TOKENS, columns, args.steps, args.warmup)
    long = report("(a) 1-layer LLaMA 512/512", SMALL, args.long_tokens, columns, args.steps, args.warmup)
    against_concrete_ml(short, long, columns[1:], args.long_tokens)
    if args.big:
        big = [c for c in columns if c.profile == "default"]
        # Kernels are compiled by now; one step per column already takes minutes.
        report("(b) 1-layer LLaMA, 8B layer sizes 4096/14336", BIG, args.long_tokens, big, args.big_steps, 0)


def against_concrete_ml(short: dict[str, Timing], long: dict[str, Timing], columns: list[Column],
                        long_tokens: int) -> dict[str, float]:
    """Print and return each column's speed-up over Concrete ML's step, per 8-token step and per
    token of ``long_tokens``-token batches, by wall and by CPU time (keys "label wall step" etc.)."""
    print(f"\nagainst Concrete ML 1.9 LoraTrainer, fhe='execute', (a): {CONCRETE_ML_EXECUTE_S} s per 8-token step"
          " (by wall time here, and by CPU time: the bound for an idle machine)")
    figures = {}
    for col in columns:
        for kind in ("wall", "cpu"):
            step_s, long_s = getattr(short[col.label], kind), getattr(long[col.label], kind)
            step_x = figures[f"{col.label} {kind} step"] = CONCRETE_ML_EXECUTE_S / step_s
            token_x = figures[f"{col.label} {kind} token"] = (CONCRETE_ML_EXECUTE_S / CONCRETE_ML_TOKENS) / (long_s / long_tokens)
            print(row(f"{col.label}, {kind}: per 8-token step", f"{step_x:,.0f}x", f"goal >= {GOAL_STEP:,.0f}x",
                      step_x >= GOAL_STEP))
            print(row(f"{col.label}, {kind}: per token, {long_tokens}-token batches", f"{token_x:,.0f}x",
                      f"goal >= {GOAL_TOKEN:,.0f}x", token_x >= GOAL_TOKEN))
    return figures


if __name__ == "__main__":
    main()
