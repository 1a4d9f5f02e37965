"""The printed estimate: every assumption, then wall time, bottlenecks, throughput and price."""

from __future__ import annotations

from .run import Estimate
from .swarm import MBIT, MESSAGE_OVERHEAD_BYTES
from .workload import Workload


def duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def size(n: float) -> str:
    for unit, k in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= k:
            return f"{n / k:.2f} {unit}"
    return f"{n:.0f} B"


def accumulation(w: Workload) -> str:
    """How micro-batches make optimizer steps and how many run at once."""
    ga = w.gradient_accumulation_steps
    if ga == 1:
        return (f"one optimizer step each (gradient accumulation 1: the micro-batches run one after another, "
                f"micro_batches_in_flight {w.micro_batches_in_flight} has nothing to overlap)")
    return (f"optimizer steps of {ga} micro-batches (gradient accumulation), {w.in_flight} of a step's micro-batches "
            f"in flight at once (micro_batches_in_flight {w.micro_batches_in_flight}), sharing the client's CPU, crypto "
            "threads, upload gate and links; the client's plaintext work one micro-batch at a time; the optimizer "
            "update waits for all of a step's")


def assumptions(e: Estimate) -> list[str]:
    """Every input the estimate rests on, one line each."""
    w, s, c, cfg = e.workload, e.swarm, e.swarm.client, e.config
    m = w.model
    p0 = s.providers[0]
    params = w.products(w.micro_batch_tokens)[0].params
    lines = [
        f"model {m.name}: {m.n_layers} blocks, hidden {m.hidden}, vocab {m.vocab}, {len(m.layers)} encrypted layers in "
        f"{len(m.groups)} groups, parameters per group from "
        f"{'its quantized weights' if m.weights_dir else 'Gaussian weight columns of its shape peaking at the largest integer'}",
        f"tokens {w.tokens:,} in micro-batches of {w.micro_batch_tokens:,} (sequences of {w.seq_len}); {accumulation(w)}; "
        f"{w.eval_batches} held-out micro-batch(es) before and after, one at a time; backward skipped for the first "
        f"{m.n_layers_to_skip_for_backprop} layer(s) (and their groups); {w.precision}",
        f"encryption profile {w.profile}: N = {params.n} token slots per block, {params.in_bytes} B per input value, "
        f"{params.out_bytes} B per output value (first call); {MESSAGE_OVERHEAD_BYTES} B per message of headers",
        "the trainer multiplies layers that read the same input as one (LLaMA's q, k, v and gate, up: their column concatenation): "
        "one call per group forward, the input uploaded once, and one g @ W^T backward, one download of its input width; "
        "a micro-batch's calls in sequence",
        f"client: {c.cores:g} cores; encrypt {c.encrypt_ns:.2f}, decrypt {c.decrypt_ns:.2f}, verify {c.verify_ns:.2f} core-ns per value, "
        f"wire {c.wire_ns_per_byte:.3f} core-ns per byte, crypto jobs use {c.crypto_parallelism:.2f} cores, {cfg.crypto_threads} at once; "
        f"plaintext {c.plain_macs_per_s:.3g} MAC/s on {c.plain_parallelism:g} cores; overheads {1e3 * c.call_overhead_s:.2f} ms "
        f"per call, {1e3 * c.exchange_overhead_s:.2f} ms per request (core time)",
    ]
    if s.shared_cores:
        lines.append(f"one machine of {s.shared_cores:g} cores shared by the client and every provider (processor sharing); "
                     f"loopback transfers cost {1e9 * s.loopback_s_per_byte:.2f} core-ns per byte")
    else:
        lines.append(f"client link {c.up_bps / MBIT:,.0f} Mbit/s up, {c.down_bps / MBIT:,.0f} Mbit/s down; flows share links max-min "
                     "fairly (no TCP slow start or loss)")
    groups: dict[tuple, list[float]] = {}  # providers alike but for their RTT, and their RTTs
    for p in s.providers:
        key = (p.macs_per_s, p.parallelism, p.price_per_gmac, p.up_bps, p.down_bps, p.slots, p.layers,
               p.fail_prob, p.cheats, p.mean_up_s, p.mean_down_s)
        groups.setdefault(key, []).append(p.rtt_s)
    for (rate, par, price, up, down, slots, layers, fail, cheats, mean_up, mean_down), rtts in groups.items():
        rtt = f"{1e3 * min(rtts):.0f}" + (f"-{1e3 * max(rtts):.0f}" if max(rtts) > min(rtts) else "")
        link = "" if s.shared_cores else f", {up / MBIT:,.0f}/{down / MBIT:,.0f} Mbit/s up/down, RTT {rtt} ms"
        churn = f", leaves every {duration(mean_up)} for {duration(mean_down)} on average" if mean_up != float("inf") else ""
        lines.append(f"{len(rtts)} provider(s): {rate:.3g} encrypted MAC/s per product on {par:.3g} core(s)/device(s), {slots} slots, "
                     f"price {price:.4g} per GMAC{link}, layers {', '.join(layers) or 'all'}, loses {100 * fail:g}% of requests{churn}"
                     + (", returns wrong results" if cheats else ""))
    lines.append(f"scheduling: node/client's own router (split {cfg.split}, at most {cfg.max_chunks} chunks per call, hedge after "
                 f"{cfg.hedge_factor:g}x the expected time, at least {cfg.hedge_min_s:g} s), peer table and bans; seed {s.seed}")
    if e.scale != 1.0:
        lines.append(f"{len(e.step_s)} of {e.steps_total} optimizer steps simulated; each of the rest at the mean time and "
                     f"counters of the simulated full steps (x{e.scale:.2f} the simulated time)")
    return lines


def render(e: Estimate, *, title: str = "estimate") -> str:
    """The assumptions, then the results, as printable lines."""
    t = e.tally
    out = [f"{title}", "assumptions:"] + [f"  - {line}" for line in assumptions(e)]
    steps = e.step_s
    out += [
        "result:",
        f"  wall time                        {duration(e.wall_s)}  ({e.wall_s:,.1f} s)",
        f"  per optimizer step               {duration(sum(steps) / len(steps)) if steps else '-'} (mean of {len(steps)} simulated, "
        f"{e.workload.gradient_accumulation_steps} micro-batch(es) each)",
        f"  held-out evaluation              {duration(e.eval_before_s)} before, {duration(e.eval_after_s)} after",
        f"  tokens/s                         {e.tokens_per_s:,.1f}",
        f"  price                            {t.paid:,.4g} ({t.paid * 1000 / e.workload.tokens:,.4g} per 1k tokens)",
        f"  provider MACs (receipts)         {t.macs:.4g}",
        f"  bytes up / down                  {size(t.bytes_up)} / {size(t.bytes_down)}",
        f"  chunks {t.chunks:,}, attempts {t.attempts:,}, retries {t.retries:,}, hedges {t.hedges:,}, timeouts {t.timeouts:,}, "
        f"unreachable {t.unreachable:,}",
        "bottlenecks (seconds each resource needs on its own; the wall time is at least the largest):",
    ]
    for name, seconds in sorted(e.demand_s.items(), key=lambda kv: -kv[1]):
        out.append(f"  {name:<44} {duration(seconds):>12}  {100 * seconds / e.wall_s:5.1f}% of wall")
    cpu = ", ".join(f"{k} {v:,.1f}" for k, v in sorted(t.cpu_s.items(), key=lambda kv: -kv[1]))
    out.append(f"  client core-seconds by kind: {cpu}")
    out.append(f"bottleneck: {e.bottleneck}")
    return "\n".join(out)
