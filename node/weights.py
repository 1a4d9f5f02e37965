"""The base weights a node serves or checks against, loaded from a Hugging Face model directory.

Which tensors are remote layers (`is_remote_layer`, the one rule: the trainer applies it to the
tensor name of each frozen `nn.Linear`/`Conv1D` it could replace, so both sides agree):
  every 2-D floating `*.weight` tensor of the directory's `*.safetensors` files, except
  embeddings (a name part containing `embed`, or `wte`/`wpe`), the output head (`lm_head`) and
  norms (a name part containing `norm` or starting with `ln`).

Orientation: the engine multiplies `x @ W` with `W` of `d_in x d_out`. A torch `nn.Linear.weight`
is `(d_out, d_in)`, so `W = weight.T`; GPT-2-style `Conv1D` layers (config `model_type` in
CONV1D_MODEL_TYPES) already store `(d_in, d_out)`.

Identity: each layer is quantized per output channel to `weight_bits`-bit integers
(`fhe_backend.quant.quantize_weight`, the one definition the trainer uses too; 11 bits by default)
and named by that quantization's SHA-256 digest, which covers the bit width. The model
is named by

    model_hash = SHA-256("cipherswarm-model-v1\\n" || for each layer, by name: name || 0x00 || digest)

over all its layers, so every node that loads the same checkpoint agrees on it, whichever subset
of layers it holds.

Layer keys: the wire carries the tensor name (`model.layers.0.self_attn.q_proj.weight`); `resolve`
also accepts the module name (`model.layers.0.self_attn.q_proj`), which is what the trainer uses.

Groups: layers that read the same input (q, k and v; gate and up) are multiplied as one layer, the
column concatenation `W = [W_1 | W_2 | ...]` (`fhe_backend.quant.concat_columns`): one encrypted
input and one call forward, and backward one product `g @ W.T`, the sum of the members' input
gradients, so one download. A group's key joins its members' keys with `GROUP_SEPARATOR` (no
module or tensor name contains it); `resolve` gives its summary, made once from the members'
weights, whose digest is that of the concatenation.

What a node keeps: every layer's public summary (shape, digest, per-channel scales, the sums of
Wq over each direction's contraction axis, the norms that choose parameters), a few bytes per
output channel; and the integer weights only of the layers it holds. A client holds none (`hold=()`):
what it needs of a weight beyond the summary, it reads from the memory-mapped files one layer at a
time (`ModelWeights.read`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from cipherswarm.fhe_backend import PlainWeights, WeightStats
from cipherswarm.fhe_backend.allocator import release_free_memory
from cipherswarm.fhe_backend.quant import WEIGHT_BITS, QuantizedWeight, concat_columns, quantize_weight
from cipherswarm.protocol import LayerShape

CONV1D_MODEL_TYPES = frozenset({"gpt2"})
"""Architectures whose linear layers are transformers' Conv1D, stored (d_in, d_out)."""
_MODEL_HASH_DOMAIN = b"cipherswarm-model-v1\n"
GROUP_SEPARATOR = "+"
"""Joins the member keys of a group's key (see the module docstring)."""


def group_key(keys: Sequence[str]) -> str:
    """The key of the layers `keys`, in this column order, multiplied as one (a single key: itself)."""
    if not keys or any(not k or GROUP_SEPARATOR in k for k in keys) or len(set(keys)) != len(keys):
        raise ValueError(f"a group is distinct, non-empty layer keys without {GROUP_SEPARATOR!r}: {list(keys)}")
    return GROUP_SEPARATOR.join(keys)


def group_members(key: str) -> list[str]:
    """The member keys of a group's key, in column order (a plain layer key: itself alone)."""
    return key.split(GROUP_SEPARATOR)


class WeightsError(Exception):
    """The model directory cannot be used; the message says why."""


class ModelMismatchError(WeightsError):
    """The model being trained is not the one the swarm serves (other weights, dtype or layers)."""


def is_remote_layer(name: str, tensor_ndim: int, floating: bool) -> bool:
    """The selection rule of the module docstring, for the tensor `name` (a module's name plus
    `.weight` on the trainer's side): a provider serves, and a client sends, exactly these layers."""
    if not name.endswith(".weight") or tensor_ndim != 2 or not floating:
        return False
    parts = name.split(".")[:-1]
    return not any(
        "embed" in p or p in ("wte", "wpe", "lm_head") or "norm" in p or p.startswith("ln") for p in parts
    )


@dataclass(frozen=True, slots=True)
class Layer:
    """One remote layer: its public summary and, if held, its integer weights."""

    name: str  # tensor name, e.g. "model.layers.0.mlp.up_proj.weight"
    shape: LayerShape  # d_in x d_out of the engine's W
    digest: bytes  # 32-byte quantization digest
    scale: torch.Tensor  # (d_out,) float32: w ~= Wq * scale, per output channel
    sums: tuple[torch.Tensor, torch.Tensor]  # int32 sums of Wq over the contraction: (d_out,) forward, (d_in,) transposed
    stats: tuple[WeightStats, WeightStats]  # the norms that choose parameters: forward, transposed
    weight: QuantizedWeight | None  # None when this node does not hold the layer

    @classmethod
    def summarise(cls, name: str, quantized: QuantizedWeight, *, keep: bool) -> "Layer":
        """The layer named `name` from its quantization, keeping the weights only if `keep`."""
        q = quantized.q
        d_in, d_out = q.shape
        return cls(
            name=name,
            shape=LayerShape(d_in, d_out),
            digest=bytes.fromhex(quantized.digest),
            scale=quantized.scale.clone(),
            sums=_sums(q),
            stats=(WeightStats.of(q), WeightStats.of(q, transpose=True)),
            weight=quantized if keep else None,
        )

    @property
    def summary_bytes(self) -> int:
        """Bytes of the summary's tensors, as held."""
        return self.scale.nbytes + sum(t.nbytes for t in self.sums)

    @staticmethod
    def summary_size(d_in: int, d_out: int) -> int:
        """Bytes a summary of a d_in x d_out layer takes (float32 scales and int32 sums both ways),
        for sizing without the layer (cipherswarm estimate)."""
        return 4 * d_out + 4 * (d_out + d_in)


def _sums(q: torch.Tensor, slab: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """Sums of integer ``q`` over its rows (d_out,) and over its columns (d_in,), a slab of rows at a
    time (torch widens a whole tensor to sum it in int64: 8 bytes per weight), kept as int32 (each
    is at most max|q| x width in magnitude: 2^31 allows 2^24-wide int8 layers, 2^16-wide int16)."""
    columns = torch.zeros(q.shape[1], dtype=torch.int64)
    rows = torch.empty(q.shape[0], dtype=torch.int64)
    for start in range(0, q.shape[0], slab):
        part = q[start : start + slab].to(torch.int64)
        columns += part.sum(dim=0)
        rows[start : start + slab] = part.sum(dim=1)
    if (1 << (8 * q.element_size() - 1)) * max(q.shape) >= 1 << 31:
        raise WeightsError(f"a layer {tuple(q.shape)} is too wide for int32 sums")
    return columns.to(torch.int32), rows.to(torch.int32)


class ModelWeights:
    """Every remote layer of one model, the subset held in memory, and the model's content hash.

    `files` maps each tensor name to the safetensors file it was read from, so that `read` can
    reload one layer; `conv1d` says whether W is stored as is (see the module docstring);
    `weight_bits` is the width every layer was quantized to."""

    def __init__(self, layers: Sequence[Layer], *, files: dict[str, Path] | None = None, conv1d: bool = False,
                 weight_bits: int = WEIGHT_BITS) -> None:
        if not layers:
            raise WeightsError("the model has no remote layers (2-D Linear/Conv1D weights)")
        self.files = dict(files or {})
        self.conv1d = conv1d
        self.weight_bits = weight_bits
        self.layers: dict[str, Layer] = {layer.name: layer for layer in sorted(layers, key=lambda l: l.name)}
        h = hashlib.sha256(_MODEL_HASH_DOMAIN)
        for layer in self.layers.values():
            h.update(layer.name.encode() + b"\x00" + layer.digest)
        self.model_hash = h.digest()
        self._plain: dict[str, PlainWeights] = {}
        self._groups: dict[str, Layer] = {}  # group summaries by their tensor-name key, made on first use

    @property
    def held(self) -> list[Layer]:
        return [layer for layer in self.layers.values() if layer.weight is not None]

    @property
    def holds_all(self) -> bool:
        return all(layer.weight is not None for layer in self.layers.values())

    def resolve(self, key: str) -> Layer:
        """The layer named by a tensor name or a module name, or the group they join into (module
        docstring; its summary is made from the members' weights on first use); KeyError says
        which names exist, WeightsError which members cannot be grouped."""
        members = group_members(key)
        if len(members) > 1:
            parts = [self.resolve(m) for m in members]
            name = group_key([p.name for p in parts])
            if name not in self._groups:
                if len({p.shape.d_in for p in parts}) != 1:
                    raise WeightsError(f"{name}: grouped layers must have the same input width")
                self._groups[name] = Layer.summarise(name, self.read(name), keep=False)
            return self._groups[name]
        layer = self.layers.get(key) or self.layers.get(key + ".weight")
        if layer is None:
            sample = ", ".join(list(self.layers)[:3])
            raise KeyError(f"{key!r} is not a remote layer of this model (names look like {sample}, ...)")
        return layer

    def members(self, key: str) -> list[Layer]:
        """The layers of a key: a group's members in column order, or the one layer."""
        return [self.resolve(m) for m in group_members(key)]

    def lookup(self, model_hash: bytes, names: Sequence[str]) -> LayerShape | None:
        """protocol.LayerLookup: the shape of the column concatenation of `names` (tensor names),
        when this node holds every one of them and they share an input width; else None."""
        layers = [self.layers.get(name) for name in names]
        if model_hash != self.model_hash or not layers or any(layer is None or layer.weight is None for layer in layers):
            return None
        if len({layer.shape.d_in for layer in layers}) != 1 or len(set(names)) != len(names):  # type: ignore[union-attr]
            return None
        return LayerShape(layers[0].shape.d_in, sum(layer.shape.d_out for layer in layers))  # type: ignore[union-attr]

    def read(self, name: str) -> QuantizedWeight:
        """The integer weights of layer `name` (of a group: its members' concatenated), held or read
        again from the memory-mapped files (only those tensors are read); WeightsError if a file no
        longer holds the weights of its digest."""
        if GROUP_SEPARATOR in name:
            return concat_columns([self.read(m) for m in group_members(name)])
        layer = self.resolve(name)
        if layer.weight is not None:
            return layer.weight
        quantized = _quantize(self.tensor(layer.name), self.conv1d, self.weight_bits)
        if bytes.fromhex(quantized.digest) != layer.digest:
            path = self.files.get(layer.name)
            raise WeightsError(f"{path} changed since it was loaded: {layer.name} no longer has digest {layer.digest.hex()[:16]}")
        return quantized

    def tensor(self, name: str) -> torch.Tensor:
        """Layer `name`'s float weight as the checkpoint stores it (an `nn.Linear.weight` is
        d_out x d_in), read from its memory-mapped file: only that tensor is read."""
        layer = self.resolve(name)
        path = self.files.get(layer.name)
        if path is None:
            raise WeightsError(f"{layer.name} is in no known file")
        return _read(path, layer.name)

    def summary_bytes(self) -> int:
        """Bytes of every layer's summary (scales, sums): what a node keeps of layers it does not hold."""
        return sum(layer.summary_bytes for layer in self.layers.values())

    def plain(self, name: str) -> PlainWeights:
        """The held layer's integer weights prepared once for many products (their norms, computed on first use)."""
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


_FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def _read(path: Path, name: str) -> torch.Tensor:
    """One tensor of a safetensors file, the file mapped only while it is read: a mapping kept open
    across a shard keeps every page read so far resident, a gigabyte per shard."""
    with safe_open(str(path), framework="pt") as f:
        return f.get_tensor(name).clone()


def _remote_tensors(model_dir: Path) -> Iterator[tuple[Path, str, torch.Tensor]]:
    """(file, name, tensor) of each remote layer, read one at a time; other tensors (embeddings,
    norms, the head) are never read."""
    for path in _safetensors_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            infos = {name: f.get_slice(name) for name in f.keys()}  # noqa: SIM118  # safe_open is not a mapping
            names = [name for name, info in infos.items()
                     if is_remote_layer(name, len(info.get_shape()), info.get_dtype() in _FLOAT_DTYPES)]
        for name in names:
            yield path, name, _read(path, name)


def _quantize(tensor: torch.Tensor, conv1d: bool, bits: int) -> QuantizedWeight:
    return quantize_weight(tensor if conv1d else tensor.t(), bits)


def load_model(model_dir: str | Path, *, layers: Sequence[str] = (), hold: bool = True,
               visit: Callable[[Layer, QuantizedWeight], None] | None = None,
               weight_bits: int = WEIGHT_BITS) -> ModelWeights:
    """Quantize every remote layer of `model_dir` to `weight_bits`, one at a time; keep in memory the weights of
    those matching a `layers` glob (against tensor or module names; no patterns: all), or of none
    when `hold` is False (a client). Every layer is quantized either way, since the model hash
    covers them all. `visit(layer, quantized)` sees each layer's integer weights before they are
    dropped: a client sketches its checkers in the same pass (`KeyRing.prepare_layer`)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise WeightsError(f"{model_dir} is not a directory")
    conv1d = _conv1d_layout(model_dir)
    found: list[Layer] = []
    files: dict[str, Path] = {}
    for path, name, tensor in _remote_tensors(model_dir):
        module = name.removesuffix(".weight")
        keep = hold and (not layers or any(fnmatch.fnmatchcase(n, p) for p in layers for n in (name, module)))
        quantized = _quantize(tensor, conv1d, weight_bits)
        found.append(Layer.summarise(name, quantized, keep=keep))
        if visit is not None:
            visit(found[-1], quantized)
        files[name] = path
        del tensor, quantized
        release_free_memory()  # this layer's transients, freed but pinned in the heap by what was kept
    weights = ModelWeights(found, files=files, conv1d=conv1d, weight_bits=weight_bits)
    if hold and not weights.held:
        raise WeightsError(f"no layer matches {list(layers)}; names look like {next(iter(weights.layers))}")
    return weights


def check_digests(weights: ModelWeights, digests: Mapping[str, bytes]) -> None:
    """ModelMismatchError unless each layer key of `digests` names a layer of `weights` with that
    quantization digest: a trainer whose model differs from the served checkpoint (other weights, another
    dtype, a different model) would otherwise train on products of weights it never had."""
    wrong: list[str] = []
    for key, digest in digests.items():
        try:
            layer = weights.resolve(key)
        except KeyError:
            wrong.append(f"{key} (not a remote layer of the served model)")
            continue
        if layer.digest != digest:
            wrong.append(f"{key} (digest {digest.hex()[:12]}, served {layer.digest.hex()[:12]})")
    if wrong:
        shown = "; ".join(wrong[:3]) + (f"; and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        raise ModelMismatchError(
            f"the model being trained differs from the model the providers serve in {len(wrong)} of {len(digests)} "
            f"layers: {shown}. Load the trainer's model from the same checkpoint, in the checkpoint's own dtype "
            "or float32 (load_remote_model does both), and the same weight bits on both sides")
