"""Per-token activation quantization around an exact integer product, as Concrete ML does it.

A remote layer computes ``x @ W`` from integers only. Per token t (one row of ``x``) the client
maps the row's range [lo_t, hi_t] onto the signed ``n_bits`` grid with a scale and a zero point,

    x[t, j] ~= s_t * (q[t, j] - z_t),   q in [-2^(n-1), 2^(n-1) - 1],   s_t = (hi_t - lo_t) / (2^n - 1),

and the weights are per-output-channel integers, ``W[j, k] ~= Wq[j, k] * c_k`` (fhe_backend.quant). Then

    (x @ W)[t, k] ~= s_t * c_k * ((q @ Wq)[t, k] - z_t * colsum(Wq)[k]).

Only ``q`` leaves the client (encrypted); ``q @ Wq`` comes back exact, and the zero-point term
``z_t * colsum(Wq)[k]`` is public, so the client subtracts it itself. The zero point is kept as a real
number (``s_t * z_t = -offset_t`` below) rather than rounded to an integer as integer-only kernels
must: the correction runs on the client in float64 anyway, and an unrounded zero point removes a
bias of up to s_t / 2 per element that would otherwise add up coherently over the contraction.

Per-token scales make every token's quantization independent of the others in its micro-batch, so
the result does not depend on how tokens are batched.

Both functions book their own CPU seconds (the calling thread's and torch's native threads', which
run its parallel ops) into ``CPU_SECONDS``, and ``booked`` does the same for any other section of
the training thread: the trainer's per-step split reads it, and nothing there has to be inferred.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from cipherswarm.fhe_backend import kernels
from cipherswarm.node.cpu import native_threads, thread_clock

CPU_SECONDS: dict[str, float] = {"quantize": 0.0, "dequantize": 0.0, "executor": 0.0}
"""Cumulative CPU seconds of the training thread's sections: quantize, dequantize, and the executor
call in between (a remote executor's hand-off to its own threads, or a local executor's work)."""
_torch_threads: list[int] = []  # native threads of the process: torch's OpenMP pool (refresh_threads)


def refresh_threads() -> None:
    """Re-read which native threads torch may run on (the OpenMP pool starts with the first
    parallel op); the trainer calls this once per step."""
    me = threading.get_native_id()
    _torch_threads[:] = [t for t in native_threads() if t != me]


_last_clock: dict[int, float] = {}  # each native thread's clock when last read
_workers: dict[int, float] = {}  # micro-batch threads counted now (native id -> their clock when counting began)
_retired = [0.0]  # CPU seconds of micro-batch threads no longer counted


def torch_cpu() -> float:
    """CPU seconds so far of the calling thread plus torch's native threads, plus what the training
    step's micro-batch threads (:func:`counted_thread`) spent while counted. A thread that has ended
    counts with its last reading, so the sum never goes back when one exits."""
    total = time.thread_time() + _retired[0]
    for tid in _torch_threads:
        try:
            _last_clock[tid] = thread_clock(tid)
        except OSError:  # ended since the last refresh
            pass
        total += _last_clock.get(tid, 0.0)
    me = threading.get_native_id()
    for tid, start in list(_workers.items()):  # registered and retired only within a turn (overlap.py)
        if tid != me:
            total += thread_clock(tid) - start
    return total


@contextmanager
def counted_thread() -> Iterator[None]:
    """Count the calling thread, a micro-batch's (trainer/overlap.py), in every thread's
    :func:`torch_cpu` while inside: the training thread's figures then include its work."""
    tid = threading.get_native_id()
    _workers[tid] = time.thread_time()
    try:
        yield
    finally:
        _retired[0] += time.thread_time() - _workers.pop(tid)


@contextmanager
def booked(part: str) -> Iterator[None]:
    """Add the CPU seconds of the enclosed training-thread code to ``CPU_SECONDS[part]``."""
    t0 = torch_cpu()
    try:
        yield
    finally:
        CPU_SECONDS[part] = CPU_SECONDS.get(part, 0.0) + torch_cpu() - t0

@dataclass(frozen=True)
class TokenQuantized:
    """Integer rows ``q`` with the float64 per-token affine map back: ``x ~= scale * q + offset``."""

    q: torch.Tensor  # (tokens, features) in the signed n_bits range, int8 up to 8 bits, else int16
    scale: torch.Tensor  # (tokens, 1) float64, > 0; 0 for a constant row (below)
    offset: torch.Tensor  # (tokens, 1) float64, equals -scale * zero_point


def quantize_per_token(x: torch.Tensor, n_bits: int, column_scale: torch.Tensor | None = None) -> TokenQuantized:
    """Quantize each row of ``x * column_scale`` (tokens x features) to ``n_bits`` over its own [min, max].

    A constant row (e.g. the zero gradient of a token no loss reads) gets scale 0 and reproduces
    exactly: all of it lands in the offset, so its product's value is multiplied by 0 and an
    approximate product's noise (the compact profile) cannot reach it. Works in
    place on one float64 copy: at 2048 tokens a pass over the activations costs about as much as
    the arithmetic, so passes and allocations are what to save.
    """
    with booked("quantize"):
        return _quantize(x, n_bits, column_scale)


def _quantize(x: torch.Tensor, n_bits: int, column_scale: torch.Tensor | None) -> TokenQuantized:
    if x.device.type == "cpu":
        return _quantize_kernel(x, n_bits, column_scale)
    return _quantize_torch(x, n_bits, column_scale)


def _quantize_kernel(x: torch.Tensor, n_bits: int, column_scale: torch.Tensor | None) -> TokenQuantized:
    """On the CPU: one fused kernel, two sweeps per row, in the training thread (under half the torch
    passes' CPU at LLaMA-8B widths, which ran on every core), the same float64 operations as
    :func:`_quantize_torch`."""
    xs = x.detach()
    if xs.dtype not in (torch.float32, torch.float64):
        xs = xs.to(torch.float32)  # bfloat16 and float16 widen exactly
    xn = np.ascontiguousarray(xs.numpy())
    cs = np.empty(0) if column_scale is None else np.ascontiguousarray(column_scale.to(torch.float64).numpy())
    tokens = xn.shape[0]
    q = np.empty(xn.shape, dtype=np.int8 if n_bits <= 8 else np.int16)
    scale, offset = np.empty(tokens), np.empty(tokens)
    finite = np.empty(tokens, dtype=np.bool_)
    kernels.quantize_rows(xn, cs, n_bits, q, scale, offset, finite)
    if not finite.all():
        raise ValueError("activations or gradients are not finite (inf or nan): training has diverged")
    return TokenQuantized(q=torch.from_numpy(q), scale=torch.from_numpy(scale).view(-1, 1),
                          offset=torch.from_numpy(offset).view(-1, 1))


def _quantize_torch(x: torch.Tensor, n_bits: int, column_scale: torch.Tensor | None) -> TokenQuantized:
    """On other devices: torch's in-place passes on one float64 copy."""
    x64 = x.detach().to(torch.float64, copy=True)
    if column_scale is not None:
        x64.mul_(column_scale)
    lo = x64.amin(dim=1, keepdim=True)
    hi = x64.amax(dim=1, keepdim=True)
    if not (torch.isfinite(lo).all() and torch.isfinite(hi).all()):
        raise ValueError("activations or gradients are not finite (inf or nan): training has diverged")
    levels = (1 << n_bits) - 1
    qmin = -(1 << (n_bits - 1))
    scale = (hi - lo) / levels
    scale = torch.where(scale > 0, scale, torch.zeros_like(scale))
    # the narrowest dtype that holds n_bits: encryption and verification read these rows once or
    # twice each, transposed, so int8 moves an eighth of int64's bytes through memory
    div = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = x64.sub_(lo).div_(div).round_().clamp_(0, levels).add_(qmin).to(torch.int8 if n_bits <= 8 else torch.int16)
    return TokenQuantized(q=q, scale=scale, offset=lo - qmin * scale)


def dequantize_product(
    y: torch.Tensor, xq: TokenQuantized, weight_sums: torch.Tensor, out_scale: torch.Tensor | None
) -> torch.Tensor:
    """Float64 ``x @ W`` from the exact integer product ``y = q @ Wq`` (tokens x out).

    ``weight_sums[k]`` sums the integer weights over the contraction for output k (the zero-point
    term's public factor); ``out_scale`` holds per-output weight scales still to apply (None when
    they were folded into ``x`` before quantization, as the backward pass does).
    """
    with booked("dequantize"):
        if y.device.type == "cpu":
            yn = np.ascontiguousarray(y.numpy())
            out = np.empty(yn.shape)
            sums = np.ascontiguousarray(weight_sums.to(torch.float64).numpy())
            cs = np.empty(0) if out_scale is None else np.ascontiguousarray(out_scale.to(torch.float64).numpy())
            s, o = xq.scale.view(-1).numpy(), xq.offset.view(-1).numpy()
            kernels.dequantize_rows(yn, s, o, sums, cs, out)  # one sweep, in the training thread
            return torch.from_numpy(out)
        out = y.to(torch.float64).mul_(xq.scale)
        out.addr_(xq.offset.view(-1), weight_sums)  # + offset_t * weight_sums_k, the zero-point term
        return out if out_scale is None else out.mul_(out_scale)
