"""Encrypted matmul against plain matmul, measured side by side in one run.

Prints, for tokens x d_in x d_out (default 2048 x 4096 x 4096):
  * provider: rlwe encrypted MAC/s / plain fp32 MAC/s (and the torch-int64 alternative),
  * client: encrypt + decrypt + verify seconds / plain fp32 seconds of the same layer, ns per value,
    and the same with the ciphertext's serialisation and the result's parsing added,
  * wire: bytes per value in and out,
  * rlwe vs zama-glwe (concrete-ml-extensions) MAC/s on a shape Zama supports.
Absolute times on a shared machine are noise; the ratios are the figures.

    python bench/backend.py            # full shapes (a minute or two on 2 cores)
    python bench/backend.py --quick    # small shapes, a smoke run
"""

from __future__ import annotations

import argparse
import platform

import torch

from cipherswarm.fhe_backend import BackendUnavailable, PlainWeights, get_backend
from cipherswarm.fhe_backend.ring import fft_library
from cipherswarm.fhe_backend.verify import FreivaldsVerifier

from common import RETAINS_FREED_MEMORY, row, timed


def bench_rlwe(tokens: int, d_in: int, d_out: int, reps: int, profile: str) -> dict[str, float]:
    """Print the table of one profile; return its figures (ratios, ns per value, bytes per slot)."""
    be = get_backend("rlwe")
    gen = torch.Generator().manual_seed(0)
    # int8, as the trainer's quantizer hands 8-bit activations over
    x = torch.randint(-128, 128, (tokens, d_in), generator=gen, dtype=torch.int8)
    w = torch.randint(-127, 128, (d_in, d_out), generator=gen, dtype=torch.int8)
    pw = PlainWeights(w)
    params = be.params_for(pw, 8, profile=profile)
    t_key, sk = timed(lambda: be.keygen(params, weights=pw), reps=1, warmup=0)
    verifier = FreivaldsVerifier.for_params(pw, params)
    be.decrypt(sk, be.matmul(be.encrypt(sk, x[:4]), pw))  # compile kernels first

    xf, wf = x.float(), w.float()
    t_plain, _ = timed(lambda: xf @ wf, reps=reps)
    t_enc, ct = timed(lambda: be.encrypt(sk, x), reps=reps)
    t_mm, out = timed(lambda: be.matmul(ct, pw), reps=max(1, reps - 2), warmup=0)
    t_dec, y = timed(lambda: be.decrypt(sk, out), reps=reps)
    t_ser, wire_in = timed(lambda: ct.to_bytes(), reps=reps)
    wire_out = out.to_bytes()
    t_parse, _ = timed(lambda: type(out).from_bytes(wire_out), reps=reps)
    t_ver, _ = timed(lambda: verifier.check(x, y), reps=reps)
    exact = torch.equal(y, x.long() @ w.long())
    t_i64, out_i64 = timed(lambda: be.matmul(ct, pw, method="i64"), reps=1, warmup=0)
    exact = exact and torch.equal(be.decrypt(sk, out_i64), y)

    macs = tokens * d_in * d_out
    in_vals, out_vals = tokens * d_in, tokens * d_out
    client = t_enc + t_dec + t_ver
    shared = profile == "shared-mask"
    print(f"\nrlwe ({profile} profile), {tokens} tokens x {d_in} x {d_out}, 8-bit activations, int8 weights: {params}")
    print(row("client FFTs by", fft_library()))
    print(row("exact (decrypt(matmul(encrypt(x))) == x @ w)", str(exact), "", exact))
    print(row("plain fp32 matmul", f"{t_plain * 1e3:.0f} ms"))
    print(row("plain fp32 ns per output value", f"{t_plain * 1e9 / out_vals:.1f} ns"))
    print(row(f"provider rlwe matmul ({2 if shared else 4} float64 limb GEMMs)", f"{t_mm * 1e3:.0f} ms"))
    r_prov = (macs / t_mm) / (macs / t_plain)
    goal = 1 / 10 if shared else 1 / 20
    print(row("provider encrypted MAC/s / plain fp32 MAC/s", f"1/{1 / r_prov:.1f}", f"goal >= 1/{1 / goal:.0f}", r_prov >= goal))
    r_i64 = (macs / t_i64) / (macs / t_plain)
    print(row("  same via torch int64 GEMMs (method='i64')", f"1/{1 / r_i64:.1f}", "(alternative)"))
    print(row("client encrypt", f"{t_enc * 1e9 / in_vals:.1f} ns/value"))
    print(row("client decrypt", f"{t_dec * 1e9 / out_vals:.1f} ns/value"))
    print(row("client Freivalds verify", f"{t_ver * 1e9 / out_vals:.1f} ns/value"))
    r_client = client / t_plain
    print(row("client (encrypt+decrypt+verify) / plain fp32 layer", f"{r_client:.2f}", "must be < 1", r_client < 1))
    print(row("  the same against the goal", f"{r_client:.2f}", "goal <= 0.25", r_client <= 0.25))
    # what the client really runs per layer also turns the ciphertext into bytes and parses the reply
    print(row("client ciphertext -> wire bytes", f"{t_ser * 1e9 / in_vals:.1f} ns/value"))
    print(row("client wire bytes -> result", f"{t_parse * 1e9 / out_vals:.1f} ns/value"))
    r_wire = (client + t_ser + t_parse) / t_plain
    print(row("client with wire conversion / plain fp32 layer", f"{r_wire:.2f}", "goal <= 0.25", r_wire <= 0.25))
    bin_ = len(wire_in) / in_vals
    bout = len(wire_out) / out_vals
    # a block always holds N token slots: with fewer tokens the padding costs bytes too
    print(row("wire bytes per input value, this shape (headers, padding)", f"{bin_:.3f} B"))
    print(row("wire bytes per output value, this shape", f"{bout:.3f} B"))
    print(row("bytes per slot in (8-bit activations)", f"{params.in_bytes} B", "goal <= 6", params.in_bytes <= 6))
    out_goal = 4 if shared else 8
    print(row("bytes per slot out", f"{params.out_bytes} B", f"goal <= {out_goal}", params.out_bytes <= out_goal))
    if shared:
        print(row("client key set-up per layer (Z = W^T S and its FFTs), once", f"{t_key * 1e3:.0f} ms"))
    return dict(exact=float(exact), provider=r_prov, provider_i64=r_i64, client=r_client, client_wire=r_wire,
                serialise_ns=t_ser * 1e9 / in_vals, parse_ns=t_parse * 1e9 / out_vals,
                encrypt_ns=t_enc * 1e9 / in_vals, decrypt_ns=t_dec * 1e9 / out_vals, verify_ns=t_ver * 1e9 / out_vals,
                plain_ns=t_plain * 1e9 / out_vals, in_bytes=params.in_bytes, out_bytes=params.out_bytes)


def bench_vs_zama(tokens: int, d: int, reps: int) -> float | None:
    """Provider MAC/s of both backends on d x d weights; returns rlwe (full block) / zama-glwe, or
    None when concrete-ml-extensions is not installed.

    Zama's cost is linear in the token count (rows are processed one after another), so its MAC/s
    at a few tokens is its MAC/s at any count; rlwe's cost is per block of N tokens, so it is shown
    both at Zama's token count (mostly padding) and at one full block.
    """
    gen = torch.Generator().manual_seed(1)
    w = torch.randint(-127, 128, (d, d), generator=gen, dtype=torch.int8)
    try:
        get_backend("zama-glwe")
    except BackendUnavailable as exc:
        print(f"\nzama-glwe skipped: {exc}")
        return None
    rates = {}
    for name, t in (("zama-glwe", tokens), ("rlwe", tokens), ("rlwe", 2048)):
        be = get_backend(name)
        x = torch.randint(-128, 128, (t, d), generator=gen)
        params = be.params_for(w, 8)
        sk = be.keygen(params)
        ct = be.encrypt(sk, x)
        zama = name == "zama-glwe"
        dt, out = timed(lambda: be.matmul(ct, w), reps=1 if zama else reps, warmup=0 if zama else 1)
        rates[(name, t)] = t * d * d / dt
        err = (be.decrypt(sk, out) - x @ w.long()).abs().max().item()
        print(row(f"{name} provider MAC/s at {t} x {d} x {d}", f"{rates[(name, t)]:.3g}", f"max |error| {err}"))
    zama_rate = rates[("zama-glwe", tokens)]
    print(row(f"rlwe / zama-glwe MAC/s, both at {tokens} tokens", f"{rates[('rlwe', tokens)] / zama_rate:,.0f}x"))
    ratio = rates[("rlwe", 2048)] / zama_rate
    print(row("rlwe (full block) / zama-glwe MAC/s", f"{ratio:,.0f}x", "goal >= 10,000x", ratio >= 10_000))
    return ratio


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-out", type=int, default=4096)
    ap.add_argument("--zama-tokens", type=int, default=2, help="tokens for the Zama comparison (~15 s each)")
    ap.add_argument("--zama-dim", type=int, default=512, help="square weight size for the Zama comparison")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="small shapes: a smoke run in seconds")
    ap.add_argument("--no-zama", action="store_true")
    ap.add_argument("--profile", choices=["default", "shared-mask", "both"], default="both")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.d_in, args.d_out, args.reps = 256, 512, 512, 2
    print(f"machine: {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
          f"torch {torch.__version__}, freed buffers kept for reuse (as the cipherswarm command does): {RETAINS_FREED_MEMORY}")
    for profile in ("default", "shared-mask") if args.profile == "both" else (args.profile,):
        bench_rlwe(args.tokens, args.d_in, args.d_out, args.reps, profile)
    if not args.no_zama:
        print(f"\nrlwe vs zama-glwe")
        bench_vs_zama(args.zama_tokens, args.zama_dim, args.reps)


if __name__ == "__main__":
    main()
