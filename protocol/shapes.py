"""Checking a request's weight slice and operand shapes against the layer it names.

Convention (as in fhe_backend): a layer computes y = x @ W with W of d_in x d_out, i.e. the
transpose of a torch `nn.Linear.weight` (d_out x d_in). A request multiplies its operand by
S = W[rows, cols], or by S^T when `transpose` is set (the backward pass, G @ W^T):

    forward:  [m, len(rows)] @ S   -> [m, len(cols)]
    backward: [m, len(cols)] @ S^T -> [m, len(rows)]
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import ContractionTooThin, ShapeMismatch
from .messages import MAX_DIM, MatmulRequest


@dataclass(frozen=True, slots=True)
class LayerShape:
    """A layer's weight shape as the provider holds it; the node fills one per (model, layer)."""

    d_in: int  # rows of W: the layer's input features
    d_out: int  # columns of W: the layer's output features

    def __post_init__(self) -> None:
        for name in ("d_in", "d_out"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise TypeError(f"{name} must be int")
            if not 0 < value <= MAX_DIM:
                raise ValueError(f"{name} must be in [1, {MAX_DIM}], got {value}")


def check_shapes(request: MatmulRequest, layer: LayerShape, *, min_contraction: int = 1) -> None:
    """Raise ShapeMismatch unless the slice lies inside the layer and the shapes fit the slice, and
    ContractionTooThin (a ShapeMismatch) if it contracts over fewer than `min_contraction` features
    while the layer has more: a whole contraction is always allowed."""
    rows, cols = request.weight_slice.rows, request.weight_slice.cols
    if rows.stop > layer.d_in or cols.stop > layer.d_out:
        raise ShapeMismatch(
            "weight slice outside the layer", expected=(layer.d_in, layer.d_out), got=(rows.stop, cols.stop)
        )
    k, n = (len(cols), len(rows)) if request.transpose else (len(rows), len(cols))
    m = request.input_shape[0]
    if request.input_shape != (m, k):
        raise ShapeMismatch("input shape does not fit the weight slice", expected=(m, k), got=request.input_shape)
    if request.output_shape != (m, n):
        raise ShapeMismatch(
            "output shape does not fit the input and the weight slice", expected=(m, n), got=request.output_shape
        )
    full = layer.d_out if request.transpose else layer.d_in
    if k < min(min_contraction, full):
        raise ContractionTooThin(minimum=min(min_contraction, full), got=k)
