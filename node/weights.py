"""The base weights a node serves or checks against, loaded from a Hugging Face model directory.

Which tensors are remote layers (the same ones the trainer replaces):
  every 2-D floating `*.weight` tensor of the directory's `*.safetensors` files, except
  embeddings (a name part containing `embed`, or `wte`/`wpe`), the output head (`lm_head`) and
  norms (a name part containing `norm` or starting with `ln`).

Orientation: the engine multiplies `x @ W` with `W` of `d_in x d_out`. A torch `nn.Linear.weight`
is `(d_out, d_in)`, so `W = weight.T`; GPT-2-style `Conv1D` layers (config `model_type` in
CONV1D_MODEL_TYPES) already store `(d_in, d_out)`.

Identity: each layer is quantized per output channel to int8 (`fhe_backend.quant.quantize_weight`,
the one definition the trainer uses too) and named by that quantization's SHA-256 digest. The model
is named by

    model_hash = SHA-256("cipherswarm-model-v1\\n" || for each layer, by name: name || 0x00 || digest)

over all its layers, so every node that loads the same checkpoint agrees on it, whichever subset
of layers it holds.

Layer keys: the wire carries the tensor name (`model.layers.0.self_attn.q_proj.weight`); `resolve`
also accepts the module name (`model.layers.0.self_attn.q_proj`), which is what the trainer uses.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cipherswarm.fhe_backend import PlainWeights
from cipherswarm.fhe_backend.quant import QuantizedWeight, quantize_weight
from cipherswarm.protocol import LayerShape

CONV1D_MODEL_TYPES = frozenset({"gpt2"})
"""Architectures whose linear layers are transformers' Conv1D, stored (d_in, d_out)."""
_MODEL_HASH_DOMAIN = b"cipherswarm-model-v1\n"


class WeightsError(Exception):
    """The model directory cannot be used; the message says why."""


def is_remote_layer(name: str, tensor_ndim: int, floating: bool) -> bool:
    """The selection rule of the module docstring."""
    if not name.endswith(".weight") or tensor_ndim != 2 or not floating:
        return False
    parts = name.split(".")[:-1]
    return not any(
        "embed" in p or p in ("wte", "wpe", "lm_head") or "norm" in p or p.startswith("ln") for p in parts
    )


@dataclass(frozen=True, slots=True)
class Layer:
    """One remote layer: its tensor name, shape, digest and, if held, its int8 weights."""

    name: str  # tensor name, e.g. "model.layers.0.mlp.up_proj.weight"
    shape: LayerShape  # d_in x d_out of the engine's W
    digest: bytes  # 32-byte quantization digest
    weight: QuantizedWeight | None  # None when this node does not hold the layer


class ModelWeights:
    """Every remote layer of one model, the subset held in memory, and the model's content hash."""

    def __init__(self, layers: Sequence[Layer]) -> None:
        if not layers:
            raise WeightsError("the model has no remote layers (2-D Linear/Conv1D weights)")
        self.layers: dict[str, Layer] = {layer.name: layer for layer in sorted(layers, key=lambda l: l.name)}
        h = hashlib.sha256(_MODEL_HASH_DOMAIN)
        for layer in self.layers.values():
            h.update(layer.name.encode() + b"\x00" + layer.digest)
        self.model_hash = h.digest()
        self._plain: dict[str, PlainWeights] = {}

    @property
    def held(self) -> list[Layer]:
        return [layer for layer in self.layers.values() if layer.weight is not None]

    @property
    def holds_all(self) -> bool:
        return all(layer.weight is not None for layer in self.layers.values())

    def resolve(self, key: str) -> Layer:
        """The layer named by a tensor name or a module name; KeyError says which names exist."""
        layer = self.layers.get(key) or self.layers.get(key + ".weight")
        if layer is None:
            sample = ", ".join(list(self.layers)[:3])
            raise KeyError(f"{key!r} is not a remote layer of this model (names look like {sample}, ...)")
        return layer

    def lookup(self, model_hash: bytes, name: str) -> LayerShape | None:
        """protocol.LayerLookup: the shape of a layer this node holds, else None."""
        layer = self.layers.get(name)
        if model_hash != self.model_hash or layer is None or layer.weight is None:
            return None
        return layer.shape

    def plain(self, name: str) -> PlainWeights:
        """The held layer's integer weights prepared once for many products (copies made on first use, norms)."""
        if name not in self._plain:
            weight = self.layers[name].weight
            if weight is None:
                raise KeyError(f"{name!r} is not held here")
            self._plain[name] = PlainWeights(weight.q)
        return self._plain[name]


def _safetensors_files(model_dir: Path) -> list[Path]:
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"{model_dir} has no *.safetensors files; save the model with save_pretrained(safe_serialization=True)")
    return files


def _conv1d_layout(model_dir: Path) -> bool:
    config = model_dir / "config.json"
    if not config.exists():
        return False
    return json.loads(config.read_text()).get("model_type") in CONV1D_MODEL_TYPES


def _tensors(model_dir: Path) -> Iterator[tuple[str, torch.Tensor]]:
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118  # safe_open is not a mapping
                yield name, f.get_tensor(name)


def load_model(model_dir: str | Path, *, layers: Sequence[str] = ()) -> ModelWeights:
    """Quantize every remote layer of `model_dir`; keep in memory those matching a `layers` glob
    (against tensor or module names; no patterns: all). Every layer is quantized either way, since
    the model hash covers them all."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir} is not a directory")
    conv1d = _conv1d_layout(model_dir)
    found: list[Layer] = []
    for name, tensor in _tensors(model_dir):
        if not is_remote_layer(name, tensor.ndim, tensor.is_floating_point()):
            continue
        quantized = quantize_weight(tensor if conv1d else tensor.t())
        d_in, d_out = quantized.q.shape
        module = name.removesuffix(".weight")
        keep = not layers or any(fnmatch.fnmatchcase(n, p) for p in layers for n in (name, module))
        found.append(Layer(name, LayerShape(d_in, d_out), bytes.fromhex(quantized.digest), quantized if keep else None))
    weights = ModelWeights(found)
    if not weights.held:
        raise WeightsError(f"no layer matches {list(layers)}; names look like {next(iter(weights.layers))}")
    return weights
