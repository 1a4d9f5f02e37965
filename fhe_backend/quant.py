"""Integer weights for the engine: per-output-channel symmetric int8, as Concrete ML does it.

Providers and clients must quantize the same base weights to the same integers (the client checks
products against them with Freivalds), so this is the single definition both use.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

WEIGHT_BITS = 8
_QMAX = (1 << (WEIGHT_BITS - 1)) - 1  # 127: symmetric, so -128 is never used


@dataclass(frozen=True)
class QuantizedWeight:
    """``w ~= q * scale`` with q int8 (d_in x d_out) and one float scale per output column."""

    q: torch.Tensor  # (d_in, d_out) int8
    scale: torch.Tensor  # (d_out,) float32

    @property
    def digest(self) -> str:
        """sha256 of shape and integer values: names the exact weights a provider must use."""
        h = hashlib.sha256()
        h.update(f"int8:{self.q.shape[0]}x{self.q.shape[1]}:".encode())
        h.update(self.q.contiguous().numpy().data)  # the buffer itself: no copy of a layer-sized array
        return h.hexdigest()


def quantize_weight(w: torch.Tensor) -> QuantizedWeight:
    """Quantize ``w`` (d_in x d_out, float) per output column to int8 with a symmetric scale."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"weights must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    # one float32 working copy, scaled, rounded and clamped in place: nodes quantize whole
    # checkpoints a layer at a time, and each temporary would be another 4 bytes per weight
    w32 = w.detach().to(torch.float32, copy=True)
    amax = torch.linalg.vector_norm(w32, ord=float("inf"), dim=0)
    scale = torch.where(amax > 0, amax / _QMAX, torch.ones_like(amax))
    q = w32.div_(scale).round_().clamp_(-_QMAX, _QMAX).to(torch.int8)
    return QuantizedWeight(q=q.contiguous(), scale=scale)
