"""The acceptance test a provider runs on a device's int8 GEMM before serving with it.

It exercises the whole RLWE backend (keys, encryption, both profiles, both directions), so it sits
above the backends rather than in ``int8_limbs``, the GEMM leaf they are built on.
"""

from __future__ import annotations

import numpy as np
import torch

from .evaluator import matmul
from .int8_limbs import Int8Gemm, cpu_int8_gemm
from .rlwe import RlweBackend


def self_check(gemm: Int8Gemm, *, seed: int = 0) -> str | None:
    """None if ``gemm`` is exact, else why not: a provider runs this before it serves on a device.

    Two checks, both bit for bit against the CPU: the raw GEMM on random int8 operands with every
    extreme value and odd sizes (a wrong int32 anywhere shows), then a whole encrypted product of
    each profile and transpose by method="int8" against method="f64", with unrounded outputs so
    that no error can hide below the output modulus switch. Any exception counts as a failure.
    """
    try:
        rng = np.random.default_rng(seed)
        a = rng.integers(-128, 128, (37, 70), dtype=np.int8)
        b = rng.integers(-128, 128, (70, 1030), dtype=np.int8)
        a[0], b[:, 0] = -128, -128
        if not np.array_equal(np.asarray(gemm(a, b)), cpu_int8_gemm(a, b)):
            return "its int8 GEMM differs from the CPU's"
        be = RlweBackend()
        gen = torch.Generator().manual_seed(seed)
        w = torch.randint(-128, 128, (70, 37), generator=gen, dtype=torch.int8)
        for profile in ("default", "shared-mask"):
            for transpose in (False, True):
                params = be.params_for(w, 8, transpose=transpose, switch_output=False, profile=profile)
                sk = be.keygen(params, weights=w, transpose=transpose)
                ct = be.encrypt(sk, torch.randint(-128, 128, (params.n, w.shape[1] if transpose else w.shape[0]), generator=gen))
                got = matmul(ct, w, transpose=transpose, method="int8", gemm=gemm)
                ref = matmul(ct, w, transpose=transpose, method="f64")
                if not (np.array_equal(got.b_words, ref.b_words) and (ref.a_words is None or np.array_equal(got.a_words, ref.a_words))):
                    return f"its encrypted product ({profile} profile, transpose={transpose}) differs from the CPU's"
    except Exception as exc:  # noqa: BLE001 - whatever the device raises, the provider falls back
        return f"{type(exc).__name__}: {exc}"
    return None
