"""Encrypt one layer's activations, multiply them as a provider would, decrypt and verify.

Prints the chosen parameters, whether the result is exact, the provider's encrypted throughput
against a plain fp32 matmul of the same shape, and the client's crypto time against computing the
layer itself.
"""

from __future__ import annotations

import argparse
import time

import torch


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokens", type=int, default=2048, help="activation rows (one ring block is 2048)")
    p.add_argument("--d-in", type=int, default=1024, help="input features")
    p.add_argument("--d-out", type=int, default=1024, help="output features")
    p.add_argument("--bits", type=int, default=8, help="activation bit width (2..16)")


def _clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def run(args: argparse.Namespace) -> int:
    from cipherswarm.fhe_backend import PlainWeights, get_backend
    from cipherswarm.fhe_backend.verify import FreivaldsVerifier

    be = get_backend("rlwe")
    half = 1 << (args.bits - 1)
    x = torch.randint(-half, half, (args.tokens, args.d_in))
    w = torch.randint(-127, 128, (args.d_in, args.d_out), dtype=torch.int8)
    pw = PlainWeights(w)
    params = be.params_for(pw, x_bits=args.bits)
    sk = be.keygen(params)
    print(f"layer {args.tokens} x {args.d_in} @ {args.d_in} x {args.d_out}, {args.bits}-bit activations, int8 weights")
    print(f"parameters: N={params.n}, log2 q={params.log_q}, delta={params.delta}, output bits "
          f"{params.out_bits_a}+{params.out_bits_b} (128-bit secure, decoding failure < 2^-64 per value)")
    print("warming up kernels ...", flush=True)
    be.decrypt(sk, be.matmul(be.encrypt(sk, x[:2, :16]), pw.w[:16, :4]))

    t_plain, _ = _clock(lambda: x.float() @ w.float())
    t_enc, ct = _clock(lambda: be.encrypt(sk, x))
    wire = ct.to_bytes()
    t_mm, out = _clock(lambda: be.matmul(type(ct).from_bytes(wire), pw))
    reply = out.to_bytes()
    t_dec, y = _clock(lambda: be.decrypt(sk, type(out).from_bytes(reply)))
    verifier = FreivaldsVerifier.for_params(pw, params)
    t_ver, _ = _clock(lambda: verifier.check(x, y))
    exact = torch.equal(y, x @ w.long())
    print(f"exact: {exact}   (decrypt(provider(encrypt(x))) == x @ w, Freivalds check passed)")
    print(f"provider encrypted matmul: {t_mm:.2f} s vs plain fp32 {t_plain:.3f} s -> throughput ratio 1/{t_mm / t_plain:.1f}")
    print(f"client encrypt+decrypt+verify: {t_enc + t_dec + t_ver:.3f} s -> {(t_enc + t_dec + t_ver) / t_plain:.2f}x the plain layer")
    print(f"wire: {len(wire) / x.numel():.2f} bytes per input value, {len(reply) / y.numel():.2f} per output value")
    return 0 if exact else 1
