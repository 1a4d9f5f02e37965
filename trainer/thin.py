"""A client's model without its base weights: everything small loaded, every remote layer left on disk.

``load_remote_model(model_dir)`` builds the Hugging Face model with its parameters on the meta
device (accelerate's ``init_empty_weights``, buffers such as rotary tables built for real), reads
from the safetensors files only the tensors the client computes with itself (embeddings, norms,
the output head, biases) and puts a :class:`ThinLinear` in place of every remote layer. A
``ThinLinear`` is an ``nn.Linear`` to peft and transformers (shape, dtype and device as usual), but
its weight is a one-element placeholder: what the client needs of the layer is its public summary
(``node.weights.Layer``: digest, scales, sums), read from the same files once, one layer at a time.

In plain mode (``fhe="disable"``, or the model used outside a trainer) a ``ThinLinear`` reads its
weight from the memory-mapped file for the product and again in the backward pass, so the full
model still runs on a machine that cannot hold it, one layer at a time.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from cipherswarm.fhe_backend.quant import WEIGHT_BITS
from cipherswarm.node.weights import Layer, ModelWeights, WeightsError, load_model


class _DiskProduct(torch.autograd.Function):
    """x @ W.T with W read from disk in the forward pass and again in the backward pass: the graph
    keeps no copy of W between them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, module: "ThinLinear") -> torch.Tensor:  # type: ignore[override]
        ctx.module = module
        return x @ module.read_weight(x).t()

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        return g @ ctx.module.read_weight(g), None


def keep_placeholder(module: nn.Module, fn: Callable, apply: Callable) -> nn.Module:
    """``module._apply(fn)`` that leaves its placeholder weight alone: moving or casting a
    one-element placeholder expanded to a layer's shape would allocate the whole layer."""
    weight = module._parameters["weight"]
    module._parameters["weight"] = None
    try:
        return apply(fn)
    finally:
        module._parameters["weight"] = weight


class ThinLinear(nn.Linear):
    """A frozen ``nn.Linear`` whose weight stays in the checkpoint (see the module docstring)."""

    def __init__(self, layer: Layer, source: ModelWeights, *, bias: nn.Parameter | None, dtype: torch.dtype) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = layer.shape.d_in, layer.shape.d_out
        placeholder = torch.zeros(1, dtype=dtype).expand(self.out_features, self.in_features)
        self.weight = nn.Parameter(placeholder, requires_grad=False)
        self.register_parameter("bias", bias)
        self.remote_layer = layer  # the public summary RemoteLinear computes with
        self.source = source

    def read_weight(self, like: torch.Tensor) -> torch.Tensor:
        """The layer's float weight (d_out x d_in) from disk, in ``like``'s dtype and device."""
        return self.source.tensor(self.remote_layer.name).to(device=like.device, dtype=like.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DiskProduct.apply(x, self)
        return y if self.bias is None else y + self.bias

    def _apply(self, fn: Callable, recurse: bool = True) -> nn.Module:
        return keep_placeholder(self, fn, lambda f: super(ThinLinear, self)._apply(f, recurse))


class _UpcastProduct(torch.autograd.Function):
    """x @ W.T for a frozen W kept in a narrower dtype than x: W is widened UPCAST_ROWS rows at a time,
    in the forward pass and again in the backward pass, never whole."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.weight = weight
        return torch.cat([x @ weight[i : i + UPCAST_ROWS].to(x.dtype).t() for i in range(0, weight.shape[0], UPCAST_ROWS)], dim=-1)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None]:  # type: ignore[override]
        w = ctx.weight
        out = g[..., :UPCAST_ROWS] @ w[:UPCAST_ROWS].to(g.dtype)
        for i in range(UPCAST_ROWS, w.shape[0], UPCAST_ROWS):
            out += g[..., i : i + UPCAST_ROWS] @ w[i : i + UPCAST_ROWS].to(g.dtype)
        return out, None


#: rows of a narrow frozen matrix widened at a time (an output head: 8192 x hidden floats)
UPCAST_ROWS = 8192


class UpcastLinear(nn.Linear):
    """A frozen ``nn.Linear`` (the output head) whose weight stays in the checkpoint's narrower dtype:
    half the memory of a float32 copy, products computed in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _UpcastProduct.apply(x, self.weight)
        return y if self.bias is None else y + self.bias.to(y.dtype)


class UpcastEmbedding(nn.Embedding):
    """A frozen ``nn.Embedding`` kept in the checkpoint's narrower dtype; its rows come out in ``dtype``."""

    compute_dtype: torch.dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids).to(self.compute_dtype)


def _keep_narrow(model: nn.Module, dtype: torch.dtype) -> None:
    """Give the input embeddings and the output head their Upcast classes when their weights are
    narrower than ``dtype``: the client reads them, never trains them, so it keeps them as stored."""
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if isinstance(embed, nn.Embedding) and type(embed) is nn.Embedding and embed.weight.dtype.itemsize < dtype.itemsize:
        embed.__class__ = UpcastEmbedding
        embed.compute_dtype = dtype
    if isinstance(head, nn.Linear) and type(head) is nn.Linear and head.weight.dtype.itemsize < dtype.itemsize:
        head.__class__ = UpcastLinear


def is_thin(module: nn.Module) -> bool:
    """True for a layer whose weight is not in memory (a :class:`ThinLinear`)."""
    return isinstance(module, ThinLinear)


def _saved_inside_hint(model: nn.Module, unknown: list[str]) -> str:
    """What to do when a checkpoint stores the model under its base-model prefix (``bert.encoder...``,
    a task model around it) while the model built has no prefix: the providers serve the file's
    names, so the names of the model trained must be the same."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix or not any(name.startswith(prefix + ".") for name in unknown):
        return ""
    return (f": the checkpoint holds the model inside a task model (names under {prefix + '.'!r}); save the bare "
            "model on its own (AutoModel.from_pretrained(dir).save_pretrained(new_dir)), serve and train that")


def load_remote_model(model_dir: str | Path, weights: ModelWeights | None = None, *,
                      dtype: torch.dtype = torch.float32, weight_bits: int = WEIGHT_BITS,
                      auto_class: type = AutoModelForCausalLM) -> tuple[nn.Module, ModelWeights]:
    """The model of ``model_dir`` (built by ``auto_class``: a causal LM by default, ``AutoModel``
    for a bare encoder) with every remote layer a :class:`ThinLinear`, and the layers'
    summaries (``weights``, loaded from the same files unless given: a ``SwarmClient`` shares its
    own, so trainer and client compute with one reading of the checkpoint). Tensors the client
    keeps are cast to ``dtype``; ``weight_bits``: the quantization of summaries loaded here.
    WeightsError if the files do not fit the config."""
    model_dir = Path(model_dir)
    if weights is None:
        weights = load_model(model_dir, hold=False, weight_bits=weight_bits)
    if weights.conv1d:
        raise WeightsError(f"{model_dir}: thin loading supports nn.Linear models; GPT-2-style Conv1D layers need the full model")
    config = AutoConfig.from_pretrained(model_dir)
    with init_empty_weights(include_buffers=False):
        model = auto_class.from_config(config, dtype=dtype)
    expected = dict(model.state_dict(keep_vars=True))
    rebuilt = {name for name, _ in model.named_buffers()}  # built from the config (position ids), not read
    frozen_reads = {id(m.weight) for m in (model.get_input_embeddings(), model.get_output_embeddings()) if m is not None}
    readonly = {name for name, t in expected.items() if id(t) in frozen_reads}  # may stay narrow (_keep_narrow)
    kept: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  # safe_open is not a mapping
                if name in weights.layers:
                    continue
                if name not in expected:
                    if name not in rebuilt:
                        unknown.append(name)
                    continue
                t = f.get_tensor(name)
                narrow = name in readonly and t.is_floating_point() and t.dtype.itemsize < dtype.itemsize
                kept[name] = t if narrow or not t.is_floating_point() else t.to(dtype)
    unknown += [name for name in weights.layers if name not in expected]
    if unknown:
        raise WeightsError(f"{model_dir}: tensors {unknown[:3]} do not belong to a {type(model).__name__} of this "
                           f"config{_saved_inside_hint(model, unknown)}")
    model.load_state_dict(kept, strict=False, assign=True)
    for name, layer in weights.layers.items():
        module_name = name.removesuffix(".weight")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child, None)
        if not isinstance(base, nn.Linear) or tuple(base.weight.shape) != (layer.shape.d_out, layer.shape.d_in):
            raise WeightsError(f"{model_dir}: {name} {layer.shape} is not an nn.Linear of the model built from its config")
        setattr(parent, child, ThinLinear(layer, weights, bias=base.bias, dtype=dtype))
    model.tie_weights()
    _keep_narrow(model, dtype)
    missing = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if missing:
        raise WeightsError(f"{model_dir}: the checkpoint lacks {missing[:3]}{' ...' if len(missing) > 3 else ''}")
    model.requires_grad_(False)
    model.eval()
    return model, weights

