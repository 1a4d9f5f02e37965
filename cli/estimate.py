"""Predict the wall time and price of an encrypted LoRA fine-tune on a swarm, by simulation.

A discrete-event simulation (cipherswarm.node.sim) replays the trainer's sequence of encrypted
calls (one per group of layers that read the same input, e.g. LLaMA's q, k, v: the input is
uploaded once), as the trainer itself plans it on the model built without weights
(cipherswarm.trainer.workload), with the client's own chunk router, peer table, hedging and
retries, on a model of the client's CPU and links and the providers' devices and links. It prints every assumption, the
predicted wall time, tokens/s, price and what bounds the time (client uplink, downlink, crypto CPU,
provider compute, latency). Nothing here is measured: the defaults are stated assumptions
(consumer GPUs on home links); `bench/simulate.py` measures this machine and checks the simulator
against the real testnet.

    cipherswarm estimate                                     # LLaMA-3-8B, 100k tokens, 100 consumer GPUs
    cipherswarm estimate --profile compact --client-up-mbit 1000 --client-down-mbit 1000
    cipherswarm estimate --model tiny --tokens 20480 --micro-batch-tokens 2048 --providers 3
    cipherswarm estimate --micro-batch-tokens 16384 --accumulation 2 --in-flight 2   # two half micro-batches at once
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from functools import cache
from pathlib import Path

from cipherswarm.cli.bits import add_binding_budget_argument, add_precision_arguments, add_profile_argument, precision_of
from cipherswarm.cli.steps import add_step_arguments
from cipherswarm.node.client.config import ClientConfig
from cipherswarm.node.sim import ClientSpec, Estimate, GpuAssumption, ModelShape, ProviderSpec, Swarm, Workload, simulate
from cipherswarm.node.sim.policy import ChunkFailed
from cipherswarm.node.sim.report import render
from cipherswarm.node.sim.swarm import MBIT
from cipherswarm.protocol import DEFAULT_MAX_PAYLOAD_SIZE
from cipherswarm.trainer.finetune import FinetuneConfig
from cipherswarm.trainer.workload import LLAMA_3_8B, LLAMA_3_70B, traced_model

TINY = Path(__file__).resolve().parents[1] / "trainer" / "assets" / "tiny-shakespeare-llama"
GPU = GpuAssumption()
CLIENT = ClientSpec()


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("workload")
    g.add_argument("--model", default="llama-3-8b",
                   help="llama-3-8b (32 blocks, hidden 4096, intermediate 14336, 32 heads, 8 KV heads, vocab 128256), "
                        "llama-3-70b (80 blocks, hidden 8192, intermediate 28672, 64 heads, 8 KV heads), "
                        "tiny (the bundled tiny LLaMA, exact parameters from its weights), or a HF model directory / "
                        "config.json path (default llama-3-8b)")
    g.add_argument("--tokens", type=int, default=100_000, help="training tokens in all (default 100000)")
    g.add_argument("--micro-batch-tokens", type=int, default=16 * 2048,
                   help="tokens per micro-batch (--accumulation of them per optimizer step); at LLaMA widths and the default precision a "
                        "ring block holds 4096 tokens, so 8 blocks give each call's blocks to 8 providers (default 32768)")
    add_step_arguments(g)  # the trainer's: the estimate runs its micro-batches the same way
    g.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    g.add_argument("--eval-batches", type=int, default=0, help="held-out micro-batches evaluated before and after (default 0)")
    g.add_argument("--skip-backprop", type=int, default=FinetuneConfig.n_layers_to_skip_for_backprop,
                   help=f"n_layers_to_skip_for_backprop (default {FinetuneConfig.n_layers_to_skip_for_backprop})")
    add_profile_argument(g)
    add_precision_arguments(g)
    g.add_argument("--max-steps", type=int, default=3,
                   help="optimizer steps simulated; the rest are taken at their mean (default 3; 0: all)")
    g = p.add_argument_group("providers")
    g.add_argument("--providers", type=int, default=100, help="number of providers (default 100)")
    g.add_argument("--gpu-int8-tops", type=float, default=GPU.int8_tops_dense,
                   help=f"consumer GPU int8 tensor-core peak, dense, in tera-ops/s (default {GPU.int8_tops_dense:g}, {GPU.name})")
    g.add_argument("--gpu-efficiency", type=float, default=GPU.efficiency,
                   help=f"fraction of that peak the limb GEMMs reach (default {GPU.efficiency:g})")
    g.add_argument("--log-q", type=int, default=GPU.log_q,
                   help=f"ciphertext modulus bits, sets the int8 limbs per ciphertext matrix (default {GPU.log_q})")
    g.add_argument("--provider-macs", type=float, default=None,
                   help="encrypted MAC/s of one provider, instead of deriving it from the GPU flags")
    g.add_argument("--usd-per-gpu-hour", type=float, default=GPU.usd_per_hour,
                   help=f"rental price of one provider GPU in USD per hour, sets the price per GMAC (default {GPU.usd_per_hour:g})")
    g.add_argument("--price-per-gmac", type=float, default=None,
                   help="price per GMAC instead of deriving it, in USD, from --usd-per-gpu-hour; "
                        "give the providers' --price to get the price in their unit, the unit of receipts, `cipherswarm "
                        "ledger` and `cipherswarm train --max-price/--budget`")
    g.add_argument("--provider-up-mbit", type=float, default=50.0, help="provider uplink in Mbit/s (default 50)")
    g.add_argument("--provider-down-mbit", type=float, default=300.0, help="provider downlink in Mbit/s (default 300)")
    g.add_argument("--rtt-ms", type=float, nargs=2, default=[20.0, 60.0], metavar=("MIN", "MAX"),
                   help="client-provider round trip in ms, uniform between MIN and MAX per provider (default 20 60)")
    g.add_argument("--max-payload-mb", type=float, default=DEFAULT_MAX_PAYLOAD_SIZE / 1e6,
                   help=f"largest request a provider accepts, in MB (default {DEFAULT_MAX_PAYLOAD_SIZE / 1e6:.1f}: the provider's default)")
    g.add_argument("--slots", type=int, default=2, help="products a provider computes at once (default 2)")
    g.add_argument("--fail-prob", type=float, default=0.0, help="chance a request is silently lost, 0..1 (default 0)")
    g.add_argument("--mean-up-h", type=float, default=float("inf"),
                   help="churn: mean hours a provider stays before leaving (default inf: no churn)")
    g.add_argument("--mean-down-min", type=float, default=10.0, help="churn: mean minutes a provider stays away (default 10)")
    g = p.add_argument_group("client")
    g.add_argument("--client-cores", type=float, default=CLIENT.cores, help=f"client CPU cores (default {CLIENT.cores:g})")
    g.add_argument("--client-up-mbit", type=float, default=CLIENT.up_bps / MBIT,
                   help=f"client uplink in Mbit/s (default {CLIENT.up_bps / MBIT:g})")
    g.add_argument("--client-down-mbit", type=float, default=CLIENT.down_bps / MBIT,
                   help=f"client downlink in Mbit/s (default {CLIENT.down_bps / MBIT:g})")
    g.add_argument("--encrypt-ns", type=float, default=CLIENT.encrypt_ns,
                   help="client CPU ns (core time) to encrypt one input value (default "
                        f"{CLIENT.encrypt_ns:g}: twice bench/RESULTS.md's {CLIENT.encrypt_ns / 2:g} ns wall on 2 cores)")
    g.add_argument("--decrypt-ns", type=float, default=CLIENT.decrypt_ns,
                   help=f"client CPU ns to decrypt one output value (default {CLIENT.decrypt_ns:g}, likewise)")
    g.add_argument("--verify-ns", type=float, default=CLIENT.verify_ns,
                   help=f"client CPU ns to verify one output value (default {CLIENT.verify_ns:g}, likewise)")
    g.add_argument("--client-plain-gmacs", type=float, default=CLIENT.plain_macs_per_s / 1e9,
                   help="client plaintext GMAC/s for attention, output head and LoRA, all cores "
                        f"(default {CLIENT.plain_macs_per_s / 1e9:g})")
    g = p.add_argument_group("scheduling and input")
    g.add_argument("--max-chunks", type=int, default=ClientConfig().max_chunks,
                   help=f"most chunks per layer call, ClientConfig.max_chunks (default {ClientConfig().max_chunks})")
    g.add_argument("--hedge-min-s", type=float, default=ClientConfig().hedge_min_s,
                   help=f"seconds before a slow chunk is hedged at the earliest, ClientConfig.hedge_min_s (default {ClientConfig().hedge_min_s:g})")
    g.add_argument("--timeout-min-s", type=float, default=ClientConfig().timeout_min_s,
                   help=f"seconds before an attempt is given up at the earliest (default {ClientConfig().timeout_min_s:g})")
    g.add_argument("--request-ttl-s", type=float, default=ClientConfig().request_ttl_s,
                   help=f"lifetime of a request in seconds, at most 120 (default {ClientConfig().request_ttl_s:g})")
    add_binding_budget_argument(g)
    g.add_argument("--upload-slots", type=int, default=ClientConfig().upload_slots,
                   help=f"requests the client writes at once, ClientConfig.upload_slots (default {ClientConfig().upload_slots})")
    g.add_argument("--split", choices=["auto", "blocks", "columns", "rows"], default="auto", help="chunk split (default auto)")
    g.add_argument("--swarm-json", type=Path, default=None,
                   help="a Swarm as JSON (client, providers, shared_cores, loopback_s_per_byte, seed) instead of the "
                        "provider and client flags; --dump-swarm writes one to start from")
    g.add_argument("--dump-swarm", type=Path, default=None, help="write the swarm the flags describe as JSON to this file")
    g.add_argument("--seed", type=int, default=0, help="seed of the simulation's own random generator (default 0)")


REFERENCE_MODELS = {"llama-3-8b": LLAMA_3_8B, "llama-3-70b": LLAMA_3_70B}  # by --model name; the memory table shows both


@cache
def reference_model(name: str, skip_backprop: int) -> ModelShape:
    """A model of :data:`REFERENCE_MODELS` as the trainer plans it, once a process: a 70B trace takes seconds."""
    return traced_model(REFERENCE_MODELS[name], name=name, n_layers_to_skip_for_backprop=skip_backprop)


def load_model(name: str, skip_backprop: int = FinetuneConfig.n_layers_to_skip_for_backprop) -> ModelShape:
    """The calls of ``--model``, planned by the trainer with ``skip_backprop`` (traced_model)."""
    if name in REFERENCE_MODELS:
        return reference_model(name, skip_backprop)
    return traced_model(TINY if name == "tiny" else Path(name), n_layers_to_skip_for_backprop=skip_backprop)


def build_swarm(args: argparse.Namespace) -> Swarm:
    """The swarm the flags describe: identical consumer-GPU providers on home links, RTTs spread."""
    if args.swarm_json is not None:
        return Swarm.from_json(json.loads(args.swarm_json.read_text()))
    gpu = replace(GPU, int8_tops_dense=args.gpu_int8_tops, efficiency=args.gpu_efficiency, log_q=args.log_q,
                  usd_per_hour=args.usd_per_gpu_hour)
    rate = args.provider_macs or gpu.macs_per_s(args.profile)
    price = args.price_per_gmac if args.price_per_gmac is not None else args.usd_per_gpu_hour / (rate * 3600 / 1e9)
    rng = random.Random(args.seed)
    lo, hi = sorted(args.rtt_ms)
    providers = tuple(ProviderSpec(
        macs_per_s=rate, parallelism=1.0, price_per_gmac=price, up_bps=args.provider_up_mbit * MBIT,
        down_bps=args.provider_down_mbit * MBIT, rtt_s=rng.uniform(lo, hi) / 1e3, slots=args.slots,
        max_payload=int(args.max_payload_mb * 1e6),
        fail_prob=args.fail_prob, mean_up_s=args.mean_up_h * 3600, mean_down_s=args.mean_down_min * 60,
    ) for _ in range(args.providers))
    client = ClientSpec(
        cores=args.client_cores, encrypt_ns=args.encrypt_ns, decrypt_ns=args.decrypt_ns, verify_ns=args.verify_ns,
        crypto_parallelism=args.client_cores, plain_macs_per_s=args.client_plain_gmacs * 1e9, plain_parallelism=args.client_cores,
        up_bps=args.client_up_mbit * MBIT, down_bps=args.client_down_mbit * MBIT,
    )
    return Swarm(client=client, providers=providers, seed=args.seed)


def estimate(args: argparse.Namespace) -> Estimate:
    workload = Workload(load_model(args.model, args.skip_backprop), tokens=args.tokens, micro_batch_tokens=args.micro_batch_tokens,
                        seq_len=args.seq_len, profile=args.profile,
                        eval_batches=args.eval_batches, gradient_accumulation_steps=args.accumulation,
                        micro_batches_in_flight=args.in_flight, precision=precision_of(args))
    swarm = build_swarm(args)
    # the simulated user states the uplink's rate (train --uplink-mbit), so big uploads may go side by side
    config = ClientConfig(max_chunks=args.max_chunks, split=args.split, upload_slots=args.upload_slots,
                          hedge_min_s=args.hedge_min_s, timeout_min_s=args.timeout_min_s, request_ttl_s=args.request_ttl_s,
                          uplink_bps=swarm.client.up_bps, binding_budget=args.binding_budget_mb << 20)
    return simulate(workload, swarm, config, max_steps=args.max_steps or None)


def run(args: argparse.Namespace) -> int:
    if args.dump_swarm is not None:
        args.dump_swarm.write_text(json.dumps(build_swarm(args).to_json(), indent=2) + "\n")
    try:
        result = estimate(args)
    except ChunkFailed as exc:
        print(f"the fine-tune fails in simulation, as the client would: {exc}\n"
              "(attempt timeouts and hedge delays follow the expected compute time, not the transfer time: on a slow "
              "link raise --timeout-min-s, --request-ttl-s and --hedge-min-s, or lower --max-chunks)")
        return 1
    rate = "" if args.provider_macs or args.swarm_json else (
        f" (consumer GPU: {args.gpu_int8_tops:g} int8 TOPS x {args.gpu_efficiency:g} / "
        f"{replace(GPU, log_q=args.log_q).limb_gemms(args.profile)} limb GEMMs per product, not measured)")
    print(render(result, title=f"cipherswarm estimate: {result.workload.model.name}, {args.tokens:,} tokens, "
                               f"{len(result.swarm.providers)} providers, profile {args.profile}{rate}"))
    print(client_memory_table(result.workload, result.config.binding_budget))
    return 0


def client_memory_table(workload: Workload, binding_budget: int) -> str:
    """The client's model state for the estimated model and for LLaMA-3-8B and -70B, bf16 checkpoints:
    what a laptop needs to fine-tune a model it does not hold (activations aside), shared-mask
    bindings kept within `binding_budget` bytes."""
    models = [(workload.model.name, workload)]
    for name in REFERENCE_MODELS:
        if name != workload.model.name:
            models.append((name, replace(workload, model=reference_model(name, workload.model.n_layers_to_skip_for_backprop))))
    lines = ["client memory, model state (bf16 checkpoint; activations aside; the client holds no base weight):"]
    for name, w in models:
        m = w.client_memory(binding_budget=binding_budget)
        lines.append(
            f"  {name}: {m['total'] / 1e9:.2f} GB = {m['total'] / m['checkpoint']:.3f} of its {m['checkpoint'] / 1e9:.1f} GB "
            f"checkpoint (embeddings and head {m['frozen'] / 1e9:.2f} GB; per remote weight "
            f"{(m['summaries'] + m['sketches'] + m['keys']) / m['remote_weights']:.3f} B of summaries, sketches and keys)")
    return "\n".join(lines)
