"""The encrypted products of a fine-tune, derived from a Hugging Face config, in the trainer's order.

What the trainer does (trainer/layers.py, trainer/trainer.py) and therefore what is counted here:

- the frozen base ``nn.Linear`` layers (LLaMA: q, k, v, o, gate, up, down; GPT-2: c_attn, c_proj,
  c_fc, mlp.c_proj) that read the same input tensor are multiplied as ONE layer, the column
  concatenation ``W = [W_1 | W_2 | ...]`` of its members (node/weights.py, "Groups"): LLaMA's q, k,
  v are one group and gate, up another, o and down stay alone; every GPT-2 layer is alone (its
  c_attn already holds q, k and v). A group of one is a plain layer;
- forward, each group is one executor call per micro-batch with the micro-batch's tokens: the
  client encrypts and uploads the input once (contraction ``d_in``) and receives every member's
  output at once (width: the sum of the members' ``d_out``);
- the backward pass calls ``g @ W^T`` once per group, in reverse order (contraction: the sum of the
  members' ``d_out``, width ``d_in``: the provider sums the members' input gradients, so one download
  of ``d_in`` values per token), for every group whose input needs a gradient (autograd never asks
  the others: those before the first LoRA target's output, e.g. q, k, v of block 0 with LoRA on q
  and v) and none of whose members is among the first ``n_layers_to_skip_for_backprop`` layers in
  execution order (layers counted, not groups);
- the output head stays on the client (``remote_lm_head=False``), as do attention scores, norms and
  LoRA; the client computes those in plaintext.

A product's key is the group's key (``node.weights.group_key`` of its members' module names, in
column order), what the client routes and logs by; ``Product.layer.members`` are the layers
themselves.

Payload bytes are the ciphertext words, as ``ExecutorStatistics`` counts them (headers aside):
``Params.payload_bytes`` sent (the real tokens' B words) and ``Params.result_bytes`` received (the
real tokens' A'' and B'' words, and A'' alone for the padding of the last ring block), from the
group's real parameters (``choose_params`` of the concatenation's norms, ``ModelWeights.resolve``).
When only a config is known (no weights), the parameters are those of Gaussian weight columns of
the group's shape that peak at the largest integer of the weight bits (``Workload._layer_params``).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from cipherswarm.fhe_backend.keys import SecretKey
from cipherswarm.fhe_backend.quant import Precision
from cipherswarm.fhe_backend.params import Params, WeightStats, choose_params
from cipherswarm.fhe_backend.verify import sketch_bytes

from ..weights import CONV1D_MODEL_TYPES, Layer, group_key, load_model

LLAMA_3_8B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}
"""meta-llama/Meta-Llama-3-8B's config.json, the fields the workload reads."""

LLAMA_3_70B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}
"""meta-llama/Meta-Llama-3-70B's config.json, the fields the workload reads."""

@dataclass(frozen=True)
class LinearLayer:
    """One remote base layer: its module name and the engine's W shape (d_in x d_out)."""

    key: str
    d_in: int
    d_out: int
    group: int  # layers of one group read the same input (q, k, v; gate, up) and are multiplied as one


@dataclass(frozen=True)
class LayerGroup:
    """The layers multiplied as one: the column concatenation of `members` (d_in x sum of d_out)."""

    members: tuple[LinearLayer, ...]  # in column order, which is execution order
    start: int  # index of the first member among the model's layers in execution order

    def __post_init__(self) -> None:
        if not self.members or len({m.d_in for m in self.members}) != 1 or len({m.group for m in self.members}) != 1:
            raise ValueError(f"a group is one or more layers of one input width and group: {self.members}")

    @property
    def key(self) -> str:
        """The key the client calls, routes and logs by: its members' keys joined (node/weights.py)."""
        return group_key([m.key for m in self.members])

    @property
    def d_in(self) -> int:
        return self.members[0].d_in

    @property
    def d_out(self) -> int:
        return sum(m.d_out for m in self.members)


@dataclass(frozen=True)
class Product:
    """One executor call: ``x @ W`` (forward) or ``g @ W^T`` (backward) of one group's concatenated W."""

    layer: LayerGroup
    transpose: bool
    tokens: int
    params: Params

    @property
    def key(self) -> str:
        return self.layer.key

    @property
    def contraction(self) -> int:
        return self.layer.d_out if self.transpose else self.layer.d_in

    @property
    def width(self) -> int:
        return self.layer.d_in if self.transpose else self.layer.d_out

    @property
    def blocks(self) -> int:
        return -(-self.tokens // self.params.n)

    @property
    def padded_tokens(self) -> int:
        """Token slots encrypted and computed: whole ring blocks."""
        return self.blocks * self.params.n

    @property
    def macs(self) -> int:
        """As receipts count them: padded tokens x contraction x width."""
        return self.padded_tokens * self.contraction * self.width

    @property
    def bytes_in(self) -> int:
        return self.params.payload_bytes(self.tokens, self.contraction)

    @property
    def bytes_out(self) -> int:
        return self.params.result_bytes(self.tokens, self.width)


@dataclass(frozen=True)
class ModelShape:
    """What the workload needs of a model: its remote layers in execution order and its plaintext rest."""

    name: str
    layers: tuple[LinearLayer, ...]
    hidden: int
    n_layers: int
    vocab: int
    attn_width: int  # heads x head_dim: the width of attention scores' contraction
    weights_dir: Path | None = None  # safetensors beside the config: exact parameters per layer
    tied: bool = False  # the output head is the input embedding

    @classmethod
    def from_config(cls, config: dict[str, Any], *, name: str = "model", weights_dir: Path | None = None) -> "ModelShape":
        """LLaMA-style (q/k/v/o, gate/up/down) or GPT-2-style (c_attn, c_proj, c_fc) blocks."""
        if config.get("model_type") in CONV1D_MODEL_TYPES:
            h, n = config["n_embd"], config["n_layer"]
            inner = config.get("n_inner") or 4 * h
            layers = [layer for i in range(n) for layer in (
                LinearLayer(f"transformer.h.{i}.attn.c_attn", h, 3 * h, 4 * i), LinearLayer(f"transformer.h.{i}.attn.c_proj", h, h, 4 * i + 1),
                LinearLayer(f"transformer.h.{i}.mlp.c_fc", h, inner, 4 * i + 2),
                LinearLayer(f"transformer.h.{i}.mlp.c_proj", inner, h, 4 * i + 3))]
            return cls(name, tuple(layers), h, n, config["vocab_size"], h, weights_dir, config.get("tie_word_embeddings", True))
        h, n, inter = config["hidden_size"], config["num_hidden_layers"], config["intermediate_size"]
        heads = config["num_attention_heads"]
        head_dim = config.get("head_dim") or h // heads
        kv = config.get("num_key_value_heads") or heads
        layers = []
        for i in range(n):
            p = f"model.layers.{i}"
            g = 4 * i
            layers += [
                LinearLayer(f"{p}.self_attn.q_proj", h, heads * head_dim, g),
                LinearLayer(f"{p}.self_attn.k_proj", h, kv * head_dim, g),
                LinearLayer(f"{p}.self_attn.v_proj", h, kv * head_dim, g),
                LinearLayer(f"{p}.self_attn.o_proj", heads * head_dim, h, g + 1),
                LinearLayer(f"{p}.mlp.gate_proj", h, inter, g + 2), LinearLayer(f"{p}.mlp.up_proj", h, inter, g + 2),
                LinearLayer(f"{p}.mlp.down_proj", inter, h, g + 3),
            ]
        return cls(name, tuple(layers), h, n, config["vocab_size"], heads * head_dim, weights_dir,
                   config.get("tie_word_embeddings", False))

    @cached_property
    def groups(self) -> tuple[LayerGroup, ...]:
        """The layers as the trainer multiplies them, in execution order: each run of consecutive
        layers of one ``group`` is one (a group's layers read one input, so they are adjacent)."""
        out: list[LayerGroup] = []
        run: list[LinearLayer] = []
        for i, layer in enumerate(self.layers):
            if run and layer.group != run[0].group:
                out.append(LayerGroup(tuple(run), i - len(run)))
                run = []
            run.append(layer)
        if run:
            out.append(LayerGroup(tuple(run), len(self.layers) - len(run)))
        if len({g.members[0].group for g in out}) != len(out):
            raise ValueError(f"{self.name}: the layers of a group must be adjacent in execution order")
        return tuple(out)

    @classmethod
    def load(cls, path: str | Path) -> "ModelShape":
        """A model directory (config.json, and weights if present) or a config.json file."""
        path = Path(path)
        config_file = path / "config.json" if path.is_dir() else path
        config = json.loads(config_file.read_text())
        folder = config_file.parent
        weights = folder if any(folder.glob("*.safetensors")) else None
        return cls.from_config(config, name=folder.name, weights_dir=weights)


@dataclass(frozen=True)
class Workload:
    """Every encrypted product of a fine-tune, and the client's plaintext work."""

    model: ModelShape
    tokens: int  # training tokens in all
    micro_batch_tokens: int  # tokens per micro-batch (every call of a micro-batch has this many)
    seq_len: int  # tokens per sequence (attention spans one sequence)
    n_layers_to_skip_for_backprop: int = 1
    precision: Precision = Precision()
    profile: str = "default"
    eval_batches: int = 0  # forward-only held-out micro-batches, evaluated before training and again after
    lora_r: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step (the trainer's training_args)
    micro_batches_in_flight: int = 2  # micro-batches of one optimizer step run at once (LoraTrainer's argument)

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.micro_batch_tokens < 1 or self.seq_len < 1:
            raise ValueError("tokens, micro_batch_tokens and seq_len must be >= 1")
        for name in ("gradient_accumulation_steps", "micro_batches_in_flight"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        object.__setattr__(self, "_params", self._layer_params())

    @property
    def micro_batches(self) -> list[int]:
        """Tokens of each training micro-batch (the last may be short)."""
        full, rest = divmod(self.tokens, self.micro_batch_tokens)
        return [self.micro_batch_tokens] * full + ([rest] if rest else [])

    @property
    def optimizer_steps(self) -> list[list[int]]:
        """Tokens of each micro-batch, grouped by optimizer step: ``gradient_accumulation_steps``
        micro-batches a step, in order; the last step may have fewer (the trainer steps on an
        epoch's short last group) and its last micro-batch may be short."""
        batches, ga = self.micro_batches, self.gradient_accumulation_steps
        return [batches[i : i + ga] for i in range(0, len(batches), ga)]

    @property
    def in_flight(self) -> int:
        """Micro-batches that actually run at once: no more than a step has."""
        return min(self.micro_batches_in_flight, self.gradient_accumulation_steps)

    def _layer_params(self) -> dict[tuple[str, bool], Params]:
        """Parameters per (group key, transpose), from the norms of the group's concatenated W: the
        real quantized weights' when the directory has them (``ModelWeights.resolve`` of the group's
        key), else those of Gaussian columns of the group's shape whose largest weight is the
        largest integer (what per-channel quantization of a trained layer gives). No trained layer
        has every weight at the largest magnitude: that bound overstates the modulus by several
        bits, and at 12-bit weights and LLaMA widths it would not even fit 64-bit words."""
        weights = None
        if self.model.weights_dir is not None:
            weights = load_model(self.model.weights_dir, hold=False, weight_bits=self.precision.weight_bits)
        qmax = (1 << (self.precision.weight_bits - 1)) - 1
        out: dict[tuple[str, bool], Params] = {}
        for group in self.model.groups:
            summary = None
            if weights is not None:
                try:
                    summary = weights.resolve(group.key)
                except KeyError:
                    summary = None
            for transpose in (False, True):
                if summary is not None:
                    stats = summary.stats[transpose]
                else:
                    d = group.d_out if transpose else group.d_in  # the contraction
                    rms = qmax / math.sqrt(2 * math.log(max(d, 2)))  # d Gaussian draws peak near sqrt(2 ln d) sigma
                    stats = WeightStats(l1=math.ceil(d * rms * math.sqrt(2 / math.pi)), l2sq=math.ceil(d * rms * rms))
                out[group.key, transpose] = choose_params(stats, self.precision.x_bits(transpose), profile=self.profile)
        return out

    def client_memory(self, dtype_bytes: int = 2) -> dict[str, int]:
        """Bytes of model state a client holds to fine-tune this model remotely (activations aside),
        by the client's own rules: the frozen embeddings and head as stored (``dtype_bytes`` each),
        each remote layer's summary (node.weights.Layer), a Freivalds sketch and a key per group and
        direction, of the group's contraction and width (fhe_backend.verify, fhe_backend.keys), and
        the LoRA weights with their gradients and AdamW moments in float32. ``checkpoint`` is the
        whole checkpoint's size for comparison."""
        params: dict[tuple[str, bool], Params] = self._params  # type: ignore[attr-defined]
        m = self.model
        frozen = m.vocab * m.hidden * (1 if m.tied else 2)
        remote = sum(layer.d_in * layer.d_out for layer in m.layers)
        sketches = keys = 0
        for group in m.groups:
            for transpose in (False, True):
                p = params[group.key, transpose]
                contraction, width = (group.d_out, group.d_in) if transpose else (group.d_in, group.d_out)
                sketches += sketch_bytes(contraction, width, p)
                keys += SecretKey.bytes_for(p)
        lora = sum(self.lora_r * (layer.d_in + layer.d_out) for layer in m.layers if layer.key.rsplit(".", 1)[-1] in self.lora_targets)
        out = {
            "frozen": frozen * dtype_bytes,
            "summaries": sum(Layer.summary_size(layer.d_in, layer.d_out) for layer in m.layers),
            "sketches": sketches,
            "keys": keys,
            "lora": 4 * 4 * lora,  # weights, gradients, two AdamW moments
        }
        out["total"] = sum(out.values())
        out["checkpoint"] = (remote + frozen + (2 * m.n_layers + 1) * m.hidden) * dtype_bytes  # norms included
        out["remote_weights"] = remote
        return out

    def products(self, tokens: int, *, backward: bool = True) -> list[Product]:
        """The calls of one micro-batch of `tokens`, in the order the trainer makes them: one per
        group forward, then one per group backward in reverse, past the skipped ones (module docstring)."""
        params: dict[tuple[str, bool], Params] = self._params  # type: ignore[attr-defined]
        groups = self.model.groups
        forward = [Product(g, False, tokens, params[g.key, False]) for g in groups]
        if not backward:
            return forward
        skip = max(self.n_layers_to_skip_for_backprop, self.no_grad_prefix)  # in layers: no member may be skipped
        back = [Product(g, True, tokens, params[g.key, True]) for g in reversed(groups) if g.start >= skip]
        return forward + back

    @property
    def no_grad_prefix(self) -> int:
        """Leading layers whose input needs no gradient: autograd never asks them for g @ W^T. An
        input needs one once a LoRA target ran in an earlier group (layers sharing an input)."""
        targets = [layer.group for layer in self.model.layers if layer.key.rsplit(".", 1)[-1] in self.lora_targets]
        first = min(targets, default=None)
        if first is None:
            return len(self.model.layers)
        return sum(1 for layer in self.model.layers if layer.group <= first)

    def client_macs(self, tokens: int, *, backward: bool = True) -> float:
        """Plaintext MACs of the client for a micro-batch: attention scores and values, the output
        head and LoRA (forward, and input gradients plus LoRA weight gradients backward)."""
        m = self.model
        attention = 2 * tokens * min(self.seq_len, tokens) * m.attn_width * m.n_layers / 2  # causal: half the pairs
        head = tokens * m.hidden * m.vocab
        lora = sum(tokens * self.lora_r * (layer.d_in + layer.d_out) for layer in m.layers
                   if layer.key.rsplit(".", 1)[-1] in self.lora_targets)
        forward = attention + head + lora
        return forward * (3 if backward else 1)  # backward: two products per forward product

    def remote_macs(self, tokens: int, *, backward: bool = True) -> int:
        """Unpadded MACs of the encrypted layers (what a plaintext run computes for them)."""
        calls = self.products(tokens, backward=backward)
        return sum(tokens * p.contraction * p.width for p in calls)

    def totals(self) -> dict[str, float]:
        """Calls, MACs (as receipts count them) and payload bytes of the whole run."""
        calls = [p for t in self.micro_batches for p in self.products(t)]
        calls += [p for _ in range(2 * self.eval_batches) for p in self.products(self.micro_batch_tokens, backward=False)]
        return {"calls": len(calls), "macs": float(sum(p.macs for p in calls)),
                "bytes_in": float(sum(p.bytes_in for p in calls)), "bytes_out": float(sum(p.bytes_out for p in calls))}


def gmacs(n: float) -> str:
    """A MAC count for humans."""
    return f"{n / 1e9:,.1f} GMAC" if n < 1e15 else f"{n / 1e15:,.2f} PMAC"

