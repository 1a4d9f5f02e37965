"""Base linear layers whose products run through an executor, forward and backward.

:class:`RemoteLinear` takes the place of a frozen ``nn.Linear`` or GPT-2 ``Conv1D`` inside a model.
It keeps the very same weight and bias ``Parameter`` objects, so state-dict keys, peft's
``base_layer.weight`` and ``save_pretrained`` see no difference. What it computes with is the
layer's public summary (``node.weights.Layer``: quantization digest, per-channel scales, sums of Wq),
computed here from the weight in memory, or, for a :class:`~.thin.ThinLinear` whose weight stays
on disk, read from the checkpoint by ``load_remote_model``. With no executor it calls the
original module (plain float, ``fhe="disable"``); with one, its autograd function quantizes the
input per token, asks the executor for the exact integer product, and dequantizes; the backward
pass does the same for ``g @ W.T``. The bias, being small and possibly trainable, is added here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from cipherswarm.fhe_backend.quant import Precision, QuantizedWeight, quantize_weight
from cipherswarm.node.weights import Layer

from .executor import MatmulExecutor
from .quantization import booked, dequantize_product, quantize_per_token
from .thin import is_thin, keep_placeholder

BASE_LAYER_TYPES = (nn.Linear, Conv1D)


@dataclass
class RemoteContext:
    """What every remote layer of one model shares: how products are computed right now."""

    executor: MatmulExecutor | None = None  # None: the original float module runs (fhe="disable")
    precision: Precision = field(default_factory=Precision)  # bits of activations, gradients and weights
    trace: list[tuple[str, bool]] | None = None  # when a list: (layer key, input needs grad) per call
    #: when a dict: per layer key, [sum of squared errors, sum of squares] of its outputs against the
    #: float product of the same input (trainer.accuracy)
    errors: dict[str, list[float]] | None = None


class _RemoteProduct(torch.autograd.Function):
    """y = x @ W through the executor; dL/dx = g @ W.T through it too (W is frozen: no dL/dW)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: "RemoteLinear", executor: MatmulExecutor) -> torch.Tensor:  # type: ignore[override]
        # The backward pass runs with the forward's executor, even if the mode changed in between.
        ctx.layer, ctx.executor = layer, executor
        return layer.remote_product(x, executor, transpose=False)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        layer: RemoteLinear = ctx.layer
        if not layer.backward_enabled:
            raise RuntimeError(
                f"layer {layer.key!r} was compiled without a backward pass (n_layers_to_skip_for_backprop), "
                "but its input needs a gradient here; compile() with inputs like the ones you train on"
            )
        return layer.remote_product(g, ctx.executor, transpose=True), None, None


class RemoteLinear(nn.Module):
    """A frozen base layer computed by an executor on integer weights and activations (``context.precision``)."""

    def __init__(self, base: nn.Module, key: str, context: RemoteContext) -> None:
        super().__init__()
        self.key = key  # HF module name: "<key>.weight" is the tensor a provider holds
        self.weight = base.weight
        self.register_parameter("bias", base.bias)
        object.__setattr__(self, "original", base)  # not a submodule: no duplicate state-dict keys
        self.context = context
        self.backward_enabled = True
        self.thin = is_thin(base)
        bits = context.precision.weight_bits
        if self.thin:  # the weights stay on disk: the summary read from the same files
            if base.source.weight_bits != bits:
                raise ValueError(f"the model was loaded with {base.source.weight_bits}-bit weights, the precision asks for "
                                 f"{bits}: pass weight_bits={bits} to load_remote_model, or compile with the loaded width")
            self.layer: Layer = base.remote_layer
        else:
            w = base.weight.detach()
            engine_w = w if isinstance(base, Conv1D) else w.t()  # the engine's w is (d_in, d_out)
            self.layer = Layer.summarise(key + ".weight", quantize_weight(engine_w, bits), keep=True)
        self.in_features, self.out_features = self.layer.shape.d_in, self.layer.shape.d_out

    @property
    def quantized(self) -> QuantizedWeight | None:
        """The layer's integer weights, or None when they stay on disk."""
        return self.layer.weight

    def _apply(self, fn, recurse: bool = True) -> nn.Module:  # type: ignore[no-untyped-def]
        if self.thin:
            return keep_placeholder(self, fn, lambda f: super(RemoteLinear, self)._apply(f, recurse))
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        """Shown by ``print(model)``: which layer this is, so remote layers are easy to spot."""
        return f"{self.key!r}, in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ctx = self.context
        if ctx.trace is not None:
            ctx.trace.append((self.key, x.requires_grad))
        if ctx.executor is None:
            if self.thin and ctx.trace is not None:
                # tracing needs which layers run and whether their inputs need a gradient, not the
                # values: a zero stand-in that depends on x spares reading every layer from disk
                return (x[..., :1] * 0).expand(*x.shape[:-1], self.out_features)
            return self.original(x)
        y = _RemoteProduct.apply(x, self, ctx.executor)
        y = y if self.bias is None else y + self.bias
        if ctx.errors is not None:
            self._record_error(x, y, ctx.errors)
        return y

    def _record_error(self, x: torch.Tensor, y: torch.Tensor, errors: dict[str, list[float]]) -> None:
        """Add this call's squared error against the float product of the same input (for a thin
        layer, the weight read from disk) to ``errors[self.key]``."""
        with torch.no_grad():
            ref = self.original(x.detach()).double()
            total = errors.setdefault(self.key, [0.0, 0.0])
            total[0] += float((y.detach().double() - ref).square().sum())
            total[1] += float(ref.square().sum())

    def remote_product(self, t: torch.Tensor, executor: MatmulExecutor, *, transpose: bool) -> torch.Tensor:
        """``t @ W`` (or ``t @ W.T``) from the executor's exact integers; ``t`` is (..., features)."""
        lead = t.shape[:-1]
        flat = t.detach().reshape(-1, t.shape[-1])  # tokens, features
        dev = t.device
        # Scales and the zero-point term's factor (the sums of Wq over this direction's contraction)
        # in float64, so that dequantization adds no rounding of its own before the final cast;
        # widened per call, since a client keeps only the summary
        scale = self.layer.scale.to(dev, torch.float64)
        # Backward, g @ W.T = sum_k g[t,k] c_k Wq[j,k]: the channel scales c_k sit on the contraction
        # axis, so they are folded into g before quantizing instead of applied to the output.
        xq = quantize_per_token(flat, self.context.precision.x_bits(transpose), scale if transpose else None)
        with booked("executor"):
            y = executor.matmul(self.key, xq.q.cpu(), transpose=transpose)
        width = self.in_features if transpose else self.out_features
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (flat.shape[0], width):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"{type(executor).__name__}.matmul({self.key!r}, transpose={transpose}) must return "
                            f"an int64 tensor of shape {(flat.shape[0], width)}, got {got}")
        sums = self.layer.sums[transpose].to(dev, torch.float64)
        out = dequantize_product(y.to(dev), xq, sums, None if transpose else scale)
        return out.to(t.dtype).reshape(*lead, out.shape[-1])


def _adapter_module_ids(model: nn.Module) -> set[int]:
    """ids of every module that belongs to a peft adapter (LoRA A/B, embeddings, DoRA magnitudes)."""
    ids: set[int] = set()
    for m in model.modules():
        if isinstance(m, BaseTunerLayer):
            for name in m.adapter_layer_names:
                container = getattr(m, name, None)
                if isinstance(container, nn.Module):
                    ids.update(id(sub) for sub in container.modules())
    return ids


def module_key(name: str) -> str:
    """The HF name of a base layer inside a peft model: peft's ``.base_layer`` hops removed."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def wrap_base_layers(model: nn.Module, context: RemoteContext, *, remote_lm_head: bool) -> dict[str, RemoteLinear]:
    """Replace every frozen base ``nn.Linear``/``Conv1D`` of ``model`` (an HF model under peft) in place.

    Left alone: adapter weights, layers with trainable weights (peft's modules_to_save), and the
    output head unless ``remote_lm_head``. Returns the remote layers by key, in module order.
    """
    adapters = _adapter_module_ids(model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if isinstance(head, BaseTunerLayer):
        head = head.get_base_layer()
    targets = []
    for name, child in model.named_modules():
        if (
            isinstance(child, BASE_LAYER_TYPES)
            and id(child) not in adapters
            and not child.weight.requires_grad
            and (remote_lm_head or child is not head)
        ):
            parent_name, _, child_name = name.rpartition(".")
            targets.append((model.get_submodule(parent_name), child_name, module_key(name), child))
    layers: dict[str, RemoteLinear] = {}
    for parent, child_name, key, child in targets:
        layers[key] = RemoteLinear(child, key, context)
        setattr(parent, child_name, layers[key])
    return layers


def unwrap_base_layers(model: nn.Module) -> None:
    """Put the original modules back in place of every :class:`RemoteLinear`."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RemoteLinear):
                setattr(parent, child_name, child.original)
