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

Layers that read the same input tensor (q, k and v; gate and up: :func:`find_groups` finds them in
a traced forward) form a :class:`RemoteGroup`, computed as one layer ``[W_1 | W_2 | ...]``
(node/weights.py, "Groups"): the first member's call computes every member's columns from one
encrypted input, the others take theirs, and autograd hands the group's backward one gradient, the
members' side by side, for one product ``g @ W.T`` that sums their input gradients. Forward, a
group's outputs equal its members' own products bit for bit (a token's activation quantization does
not depend on the layer); backward, each token's gradient row is quantized once over the
whole group's width.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from functools import cached_property
from typing import NamedTuple

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from cipherswarm.fhe_backend.quant import Precision, QuantizedWeight, concat_columns, quantize_weight
from cipherswarm.node.weights import Layer, group_key, is_remote_layer

from .executor import MatmulExecutor
from .quantization import booked, dequantize_product, quantize_per_token
from .thin import is_thin, keep_placeholder

BASE_LAYER_TYPES = (nn.Linear, Conv1D)


class Call(NamedTuple):
    """One remote layer's call in a traced forward."""

    key: str
    needs_grad: bool  # its input needs a gradient, so autograd will ask for g @ W.T
    shares_input: bool  # its input is the very tensor the previous call read


@dataclass
class RemoteContext:
    """What every remote layer of one model shares: how products are computed right now."""

    executor: MatmulExecutor | None = None  # None: the original float module runs (fhe="disable")
    precision: Precision = field(default_factory=Precision)  # bits of activations, gradients and weights
    trace: list[Call] | None = None  # when a list: every call of a forward, in order
    last_input: torch.Tensor | None = None  # while tracing: the previous call's input
    #: when a dict: per layer key, [sum of squared errors, sum of squares] of its outputs against the
    #: float product of the same input (trainer.accuracy)
    errors: dict[str, list[float]] | None = None
    #: when a dict (a float forward of compile()): per layer key, a zero scalar that requires a
    #: gradient, added to the layer's output, so that whether the loss reads the layer is whether
    #: the loss's gradient reaches the scalar
    probes: dict[str, torch.Tensor] | None = None


class _RemoteProduct(torch.autograd.Function):
    """y = x @ W through the executor; dL/dx = g @ W.T through it too (W is frozen: no dL/dW)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group: "RemoteGroup", executor: MatmulExecutor) -> torch.Tensor:  # type: ignore[override]
        # The backward pass runs with the forward's executor, even if the mode changed in between.
        ctx.group, ctx.executor = group, executor
        return group.remote_product(x, executor, transpose=False)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        group: RemoteGroup = ctx.group
        if not group.backward_enabled:
            raise RuntimeError(
                f"layer {group.key!r} was compiled without a backward pass (n_layers_to_skip_for_backprop), "
                "but its input needs a gradient here; compile() with inputs like the ones you train on"
            )
        return group.remote_product(g, ctx.executor, transpose=True), None, None


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
        self._summary: Layer | None = None  # made by `layer` on first use
        if self.thin:  # the weights stay on disk: the summary read from the same files
            if base.source.weight_bits != bits:
                raise ValueError(f"the model was loaded with {base.source.weight_bits}-bit weights, the precision asks for "
                                 f"{bits}: pass weight_bits={bits} to load_remote_model, or compile with the loaded width")
            self._summary = base.remote_layer
            self.in_features, self.out_features = self._summary.shape.d_in, self._summary.shape.d_out
        else:  # the engine's W is (d_in, d_out): a Conv1D's weight as stored, an nn.Linear's transposed
            shape = base.weight.shape
            self.in_features, self.out_features = (shape[0], shape[1]) if isinstance(base, Conv1D) else (shape[1], shape[0])
        self.group = RemoteGroup([self])  # until the trainer groups it with layers reading its input

    @property
    def layer(self) -> Layer:
        """The layer's public summary (``node.weights.Layer``), quantized from the weight in memory on
        first use, not when the layer is put in place: a trace (``RemoteBaseLayers.plan``) needs
        shapes only, so a model on the meta device, which has no values to quantize, can be traced."""
        if self._summary is None:
            w = self.original.weight.detach()
            engine_w = w if isinstance(self.original, Conv1D) else w.t()
            self._summary = Layer.summarise(self.key + ".weight", quantize_weight(engine_w, self.context.precision.weight_bits),
                                            keep=True)
        return self._summary

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
            ctx.trace.append(Call(self.key, x.requires_grad, x is ctx.last_input))
            ctx.last_input = x
        if ctx.executor is None:
            if self.thin and (ctx.trace is not None or ctx.probes is not None):
                # tracing needs which layers run and what depends on what, not the values: a zero
                # stand-in that depends on x spares reading every layer from disk
                y = (x[..., :1] * 0).expand(*x.shape[:-1], self.out_features)
            else:
                y = self.original(x)
            if ctx.probes is not None:
                y = y + ctx.probes.setdefault(self.key, torch.zeros((), dtype=y.dtype, device=y.device, requires_grad=True))
            return y
        y = self.group.output(self, x, ctx.executor)
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


class RemoteGroup:
    """Remote layers that read the same input, computed as one layer ``[W_1 | W_2 | ...]`` (module
    docstring); a layer alone is a group of one. Not a module: its members stay where they are."""

    def __init__(self, members: list[RemoteLinear]) -> None:
        self.members = members
        self.key = group_key([m.key for m in members])  # what the executor is asked for
        self.context = members[0].context
        self.columns: dict[str, tuple[int, int]] = {}  # member key -> (first output column, width)
        offset = 0
        for m in members:
            self.columns[m.key] = (offset, m.out_features)
            offset += m.out_features
        if len(members) > 1 and len({m.thin for m in members}) > 1:
            raise ValueError(f"{self.key}: a group's layers are all on disk or all in memory")
        # per thread: micro-batches in flight together (overlap.py) each have their own
        self._local = threading.local()

    # The weights and summary are made on first use, as a member's are (RemoteLinear.layer): a
    # group found by a trace of a model without values (the meta device) has none to make.

    @cached_property
    def weight(self) -> QuantizedWeight | None:
        """The concatenated integer weights ``[W_1 | W_2 | ...]``, or None when they stay on disk."""
        if len(self.members) == 1:
            return self.members[0].quantized
        if self.members[0].thin:
            return None
        return concat_columns([m.quantized for m in self.members])  # type: ignore[misc]  # held: not thin

    @cached_property
    def layer(self) -> Layer:
        """The group's public summary: a member's own, the checkpoint reader's (from disk), or that of
        the concatenated weights."""
        if len(self.members) == 1:
            return self.members[0].layer
        if self.members[0].thin:
            return self.members[0].original.source.resolve(self.key)
        return Layer.summarise(group_key([m.key + ".weight" for m in self.members]), self.weight, keep=False)  # type: ignore[arg-type]

    @property
    def backward_enabled(self) -> bool:
        """Every member's backward is needed once one's is: they share the input."""
        return all(m.backward_enabled for m in self.members)

    def output(self, member: RemoteLinear, x: torch.Tensor, executor: MatmulExecutor) -> torch.Tensor:
        """``member``'s product with ``x``: its columns of the group's product, computed by the first
        member to ask and taken by the others with the same input. A member whose input is not the
        one computed (a forward that runs otherwise than the traced one) gets a fresh product."""
        if len(self.members) == 1:
            return _RemoteProduct.apply(x, self, executor)
        pending = getattr(self._local, "pending", None)
        if pending is None or pending[0] is not x or pending[1] is not executor or member.key in pending[3]:
            pending = (x, executor, _RemoteProduct.apply(x, self, executor), set())
        pending[3].add(member.key)
        # held until every member took its columns, and no longer: it keeps x and y alive
        self._local.pending = None if len(pending[3]) == len(self.members) else pending
        start, width = self.columns[member.key]
        return pending[2].narrow(-1, start, width)

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
        width = self.layer.shape.d_in if transpose else self.layer.shape.d_out
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or tuple(y.shape) != (flat.shape[0], width):
            got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, torch.Tensor) else type(y).__name__
            raise TypeError(f"{type(getattr(executor, 'inner', executor)).__name__}.matmul({self.key!r}, transpose={transpose}) must return "
                            f"an int64 tensor of shape {(flat.shape[0], width)}, got {got}")
        sums = self.layer.sums[transpose].to(dev, torch.float64)
        out = dequantize_product(y.to(dev), xq, sums, None if transpose else scale)
        return out.to(t.dtype).reshape(*lead, out.shape[-1])


def find_groups(trace: list[Call]) -> list[list[str]]:
    """The layers of a traced forward grouped by input: runs of consecutive calls on the very same
    tensor, each layer in the run of its first call. A layer seen in two different runs (weights
    shared across places) stays alone, as do the others of those runs."""
    runs: list[list[str]] = []
    for call in trace:
        if runs and call.shares_input and call.key not in runs[-1]:
            runs[-1].append(call.key)
        else:
            runs.append([call.key])
    first: dict[str, list[str]] = {}
    for run in runs:
        for key in run:
            first.setdefault(key, run)
    conflicted = {key for run in runs for key in run if first[key] != run}
    groups: list[list[str]] = []
    seen: set[str] = set()
    for run in runs:
        members = [run] if not conflicted.intersection(run) else [[key] for key in run]
        for group in members:
            if group[0] not in seen:
                groups.append(group)
                seen.update(group)
    return groups


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

    Which are remote is the rule providers load by (``node.weights.is_remote_layer``, on the layer's
    tensor name), so that a client asks for exactly the layers a provider serves; the output head is
    remote only with ``remote_lm_head``, whatever its name. Left alone besides: adapter weights and
    layers with trainable weights (peft's modules_to_save). Returns the remote layers by key, in
    module order.
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
            and (remote_lm_head if child is head else
                 is_remote_layer(f"{module_key(name)}.weight", child.weight.dim(), child.weight.is_floating_point()))
        ):
            parent_name, _, child_name = name.rpartition(".")
            targets.append((model.get_submodule(parent_name), child_name, module_key(name), child))
    layers: dict[str, RemoteLinear] = {}
    for parent, child_name, key, child in targets:
        layers[key] = RemoteLinear(child, key, context)
        setattr(parent, child_name, layers[key])
    return layers


def unwrap_base_layers(model: nn.Module, keys: set[str] | None = None) -> None:
    """Put the original modules back in place of every :class:`RemoteLinear` (of those whose key is
    in ``keys``, when given)."""
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, RemoteLinear) and (keys is None or child.key in keys):
                setattr(parent, child_name, child.original)
