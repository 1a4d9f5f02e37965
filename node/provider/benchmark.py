"""The provider's self-benchmark: how many encrypted multiply-accumulates a second it sustains.

It runs the engine's real provider product on one full ring block (N tokens) against random int8
weights, so the figure includes the limb GEMMs and the mask expansion a request costs. MACs are
counted as receipts count them (tokens x d_in x d_out of the plaintext product), which makes the
advertised rate, the client's time estimates and the price per GMAC use one unit.
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from cipherswarm.fhe_backend import Ciphertext, MatmulResult, PlainWeights

from ..engine import ENGINE

Product = Callable[[Ciphertext, PlainWeights], MatmulResult]

BENCH_WIDTH = 256
"""d_in = d_out of the benchmark layer: big enough for the GEMMs to dominate, small enough for
the whole measurement to fit in a second on a laptop core."""


def measure_macs_per_second(budget_s: float = 1.0, *, width: int = BENCH_WIDTH, product: Product = ENGINE.matmul,
                            profile: str = "default") -> int:
    """Encrypted MAC/s of `product` (the one the provider serves with, GPU or CPU) over about
    `budget_s` seconds, after one warm-up product, for requests of `profile` (a provider advertises
    the default's; a shared-mask product, B @ W alone, takes about half the time). Blocking: run
    it in a worker thread."""
    weights = PlainWeights(torch.randint(-127, 128, (width, width), dtype=torch.int8))
    params = ENGINE.params_for(weights, 8, profile=profile)
    key = ENGINE.keygen(params, weights=weights)
    ct = ENGINE.encrypt(key, torch.randint(-128, 128, (params.n, width)))
    product(ct, weights)  # warm-up: kernel compilation and first-touch allocations
    runs, elapsed = 0, 0.0
    while runs == 0 or elapsed < budget_s:
        start = time.perf_counter()
        product(ct, weights)
        elapsed += time.perf_counter() - start
        runs += 1
    return int(runs * params.n * width * width / elapsed)
