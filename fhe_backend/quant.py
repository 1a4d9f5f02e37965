"""Integer weights for the engine, and the bit widths of a fine-tune's quantization.

Weights: per-output-channel symmetric integers of ``weight_bits`` bits (int8 storage up to 8 bits,
int16 above). Providers and clients must quantize the same base weights to the same integers (the
client checks products against them with Freivalds), so :func:`quantize_weight` is the single
definition both use, and the digest names the bit width with the values.

Defaults (:class:`Precision`): measured on a real pretrained LLaMA-architecture model (SmolLM2-135M,
bench/accuracy.py, numbers in bench/RESULTS.md). int8 weights alone cost 1% relative error per
layer, which 30 layers turn into 3.5% on the logits and 95% top-1 agreement, whatever the
activations' bits; 11-bit weights with 14-bit activations forward keep >= 99% top-1 agreement
(10-bit weights do not). Gradients tolerate 8 bits (the fine-tune's held-out loss is unchanged),
and every weight bit costs about two bits of ciphertext modulus while an activation bit costs one,
so this split keeps the bytes per token within a quarter of the all-8-bit setting, also at
LLaMA-3-8B and 70B widths, where 12-bit weights would not.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

#: weights are quantized to this many bits unless a node or trainer says otherwise
WEIGHT_BITS = 11
MIN_WEIGHT_BITS, MAX_WEIGHT_BITS = 4, 16
#: activations and gradients: the encryption engine takes 2..16 bits (params.MAX_X_BITS)
MIN_X_BITS, MAX_X_BITS = 2, 16


def check_bits(name: str, value: object, low: int, high: int) -> int:
    """``value`` as an int in [low, high], or a ValueError that names ``name`` and the range."""
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return value


@dataclass(frozen=True)
class Precision:
    """Bit widths of one fine-tune's encrypted products: activations forward (``x @ W``), gradients
    backward (``g @ W.T``) and the base weights. See the module docstring for the defaults."""

    forward_bits: int = 14
    backward_bits: int = 8
    weight_bits: int = WEIGHT_BITS

    def __post_init__(self) -> None:
        check_bits("forward_bits", self.forward_bits, MIN_X_BITS, MAX_X_BITS)
        check_bits("backward_bits", self.backward_bits, MIN_X_BITS, MAX_X_BITS)
        check_bits("weight_bits", self.weight_bits, MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)

    @classmethod
    def of(cls, n_bits: "int | Precision | None" = None, weight_bits: int | None = None) -> "Precision":
        """A Precision from Concrete ML's single ``n_bits`` (both directions), an existing one, or the
        defaults; ``weight_bits`` overrides the weights' width."""
        p = n_bits if isinstance(n_bits, Precision) else cls() if n_bits is None else cls(n_bits, n_bits)
        return p if weight_bits is None else cls(p.forward_bits, p.backward_bits, weight_bits)

    def x_bits(self, transpose: bool) -> int:
        """Bits of the quantized input of a product: gradients for the transposed one."""
        return self.backward_bits if transpose else self.forward_bits

    def __str__(self) -> str:
        return f"{self.forward_bits}-bit activations, {self.backward_bits}-bit gradients, {self.weight_bits}-bit weights"


@dataclass(frozen=True)
class QuantizedWeight:
    """``w ~= q * scale`` with q (d_in x d_out) of ``bits`` bits and one float scale per output column."""

    q: torch.Tensor  # (d_in, d_out) int8 (bits <= 8) or int16
    scale: torch.Tensor  # (d_out,) float32
    bits: int

    @property
    def digest(self) -> str:
        """sha256 of bit width, shape and integer values: names the exact weights a provider must use."""
        h = hashlib.sha256()
        h.update(f"int{self.bits}:{self.q.shape[0]}x{self.q.shape[1]}:".encode())
        h.update(self.q.contiguous().numpy().data)  # the buffer itself: no copy of a layer-sized array
        return h.hexdigest()


def concat_columns(parts: "list[QuantizedWeight]") -> QuantizedWeight:
    """The column concatenation ``[W_1 | W_2 | ...]`` of layers that read the same input: one
    product ``x @ W`` gives every member's output, and ``g @ W.T`` the sum of their input gradients.
    Its digest is the concatenation's own, so it names exactly what a provider multiplies by."""
    if not parts:
        raise ValueError("a group has at least one layer")
    bits, d_in = parts[0].bits, parts[0].q.shape[0]
    if any(p.bits != bits or p.q.shape[0] != d_in for p in parts):
        raise ValueError("grouped layers need the same input width and weight bits")
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(q=torch.cat([p.q for p in parts], dim=1), scale=torch.cat([p.scale for p in parts]), bits=bits)


def weight_dtype(bits: int) -> torch.dtype:
    """The narrowest storage of ``bits``-bit weights."""
    return torch.int8 if bits <= 8 else torch.int16


def quantize_weight(w: torch.Tensor, bits: int = WEIGHT_BITS) -> QuantizedWeight:
    """Quantize ``w`` (d_in x d_out, float) per output column to ``bits`` bits with a symmetric scale."""
    if w.ndim != 2 or not w.is_floating_point():
        raise ValueError(f"weights must be a 2-D float tensor, got {w.dtype} {tuple(w.shape)}")
    bits = check_bits("weight_bits", bits, MIN_WEIGHT_BITS, MAX_WEIGHT_BITS)
    qmax = (1 << (bits - 1)) - 1  # symmetric, so the most negative integer is never used
    # one float32 working copy, scaled, rounded and clamped in place: nodes quantize whole
    # checkpoints a layer at a time, and each temporary would be another 4 bytes per weight
    w32 = w.detach().to(torch.float32, copy=True)
    amax = torch.linalg.vector_norm(w32, ord=float("inf"), dim=0)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = w32.div_(scale).round_().clamp_(-qmax, qmax).to(weight_dtype(bits))
    return QuantizedWeight(q=q.contiguous(), scale=scale, bits=bits)
