"""The encrypted int8-limb product on a GPU against plain GEMMs on the same GPU, side by side.

Prints MAC/s for tokens x d_in x d_out (default 2048 x 4096 x 4096; MACs counted as receipts count
them, tokens x d_in x d_out of the plaintext product):
  * plain fp16 GEMM (cupy.matmul, tensor cores) and plain int8 GEMM (cuBLAS GemmEx int8 -> int32,
    called exactly as the encrypted path calls it, padding and device transpose included),
  * per profile: the encrypted product's limb GEMMs alone (one block, operands already on the
    device), then the whole encrypted product (evaluator.matmul(method="int8") with the cuBLAS GEMM:
    limb split and recombination on the host, transfers, GEMMs), checked exact by decryption,
  * each as a ratio to the plain int8 GEMM.

    python bench/gpu.py [--tokens T] [--d-in D] [--d-out E] [--reps R]

Needs the optional extra `gpu` (cupy-cuda12x) and a CUDA GPU; without them it says so and exits 1.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, Callable

import numpy as np
import torch

from cipherswarm.fhe_backend import get_backend
from cipherswarm.fhe_backend.evaluator import matmul
from cipherswarm.fhe_backend.errors import BackendUnavailable
from cipherswarm.fhe_backend.int8_limbs import LIMB_BITS, cublas_int8_gemm, cuda_device, cuda_int8_gemm
from cipherswarm.fhe_backend.ring import limb_count


def open_gpu() -> Any:
    """cupy, or exit 1 with the reason there is no GPU path here."""
    try:
        return cuda_device()
    except BackendUnavailable as exc:
        sys.exit(f"bench/gpu.py: {exc}; nothing to measure")


def device_seconds(cupy: Any, fn: Callable[[], object], reps: int) -> float:
    """Mean GPU seconds of ``fn`` over ``reps`` runs after one warm-up, by CUDA events."""
    fn()
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(reps):
        fn()
    stop.record()
    stop.synchronize()
    return cupy.cuda.get_elapsed_time(start, stop) / 1e3 / reps


def row(label: str, macs_per_s: float, int8_rate: float | None = None) -> None:
    ratio = "" if int8_rate is None else f"   1/{int8_rate / macs_per_s:.1f} of plain int8"
    print(f"  {label:<62} {macs_per_s:10.3g} MAC/s{ratio}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--d-in", type=int, default=4096)
    ap.add_argument("--d-out", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    cupy = open_gpu()
    tokens, d_in, d_out = args.tokens, args.d_in, args.d_out
    macs = tokens * d_in * d_out
    rng = np.random.default_rng(0)
    x8 = rng.integers(-128, 128, (tokens, d_in), dtype=np.int8)
    w8 = rng.integers(-128, 128, (d_in, d_out), dtype=np.int8)
    print(f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}: {tokens} tokens x {d_in} x {d_out}")

    xh, wh = cupy.asarray(x8.astype(np.float16)), cupy.asarray(w8.astype(np.float16))
    row("plain fp16 GEMM (cupy.matmul)", macs / device_seconds(cupy, lambda: cupy.matmul(xh, wh), args.reps))
    xd, wd = cupy.asarray(x8), cupy.asarray(w8)
    int8_rate = macs / device_seconds(cupy, lambda: cublas_int8_gemm(xd, wd), args.reps)
    row("plain int8 GEMM (cuBLAS GemmEx, int32 accumulate)", int8_rate)

    be = get_backend("rlwe")
    x, w = torch.from_numpy(x8).long(), torch.from_numpy(w8)
    for profile in ("default", "shared-mask"):
        params = be.params_for(w, 8, profile=profile)
        sk = be.keygen(params, weights=w)
        ct = be.encrypt(sk, x)
        gemms = (1 if params.out_bits_a == 0 else 2) * limb_count(params.in_bits, LIMB_BITS)
        print(f"\n{profile} profile: log q = {params.log_q}, N = {params.n}, {gemms} limb GEMMs per block of N tokens")
        left = cupy.asarray(np.ascontiguousarray(w8.T))
        limbs = cupy.asarray(rng.integers(-128, 128, (d_in, gemms * params.n), dtype=np.int8))
        t_gemm = device_seconds(cupy, lambda: cublas_int8_gemm(left, limbs), args.reps)
        row(f"limb GEMMs alone, one block ({params.n} tokens)", params.n * d_in * d_out / t_gemm, int8_rate)
        matmul(ct, w, method="int8", gemm=cuda_int8_gemm)  # warm-up: kernels, cuBLAS, allocations
        start = time.perf_counter()
        out = matmul(ct, w, method="int8", gemm=cuda_int8_gemm)
        t_all = time.perf_counter() - start
        row("whole encrypted product (host split/join, transfers, GEMMs)", macs / t_all, int8_rate)
        print(f"  exact (decrypt == x @ w): {torch.equal(be.decrypt(sk, out), x @ w.long())}")


if __name__ == "__main__":
    main()
