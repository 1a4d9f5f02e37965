"""The clear weight record every backend and the verifier take: a leaf, so that none of them
depends on the RLWE evaluator (or on each other) just to name a layer's weights."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import ShapeMismatch
from .params import WeightStats


@dataclass(eq=False)
class PlainWeights:
    """Clear integer weights (d_in x d_out) prepared once for many products, with their norms.

    ``w`` stays in the integer dtype it came in (int8 for quantized layers), and nothing wider is
    kept: a node holds 1 byte per int8 weight. Products convert tiles as they go
    (``evaluator.matmul``); :meth:`i64` makes a full copy on every call, for the rare exact products
    that want one.
    """

    w: torch.Tensor
    _stats: dict[bool, WeightStats] = field(init=False, repr=False, default_factory=dict)

    def __post_init__(self) -> None:
        w = self.w
        if not isinstance(w, torch.Tensor):
            w = torch.as_tensor(np.asarray(w))
        if w.ndim != 2 or w.is_floating_point() or w.is_complex() or w.dtype == torch.bool:
            raise ShapeMismatch(f"weights must be a 2-D integer tensor, got {w.dtype} {tuple(w.shape)}")
        self.w = w.contiguous()

    def i64(self) -> torch.Tensor:
        """int64 copy (a view when ``w`` is int64 already), made on each call and never kept: a
        kept one would cost 8 bytes per weight for the life of the process."""
        return self.w.to(torch.int64)

    @classmethod
    def of(cls, w: "torch.Tensor | PlainWeights") -> "PlainWeights":
        return w if isinstance(w, PlainWeights) else cls(w)

    def stats(self, transpose: bool) -> WeightStats:
        if transpose not in self._stats:
            self._stats[transpose] = WeightStats.of(self.w, transpose=transpose)
        return self._stats[transpose]


def contraction_width(pw: PlainWeights, transpose: bool) -> tuple[int, int]:
    """(contraction length, output width) of ``x @ w`` or, when ``transpose``, of ``x @ w.T``."""
    d_in, d_out = pw.w.shape
    return (d_out, d_in) if transpose else (d_in, d_out)
