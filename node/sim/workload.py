"""The encrypted products of a fine-tune, as data the trainer hands over, and what they cost.

Which layers are remote, which of them are multiplied as one group (LLaMA's q, k, v and gate, up:
the column concatenation ``W = [W_1 | W_2 | ...]`` of the layers that read one input, node/weights.py,
"Groups"), in what order a training micro-batch calls the executor and which groups get a backward
product ``g @ W^T``: none of that is decided here. The trainer decides it for a real fine-tune, by
tracing a forward of the model (``RemoteBaseLayers.plan``, trainer/remote.py), and the same code
plans the simulated one: ``cipherswarm.trainer.workload.traced_model`` builds the model on the meta
device (shapes, no weights: LLaMA-3-70B fits), plans it, and gives the calls to this package as a
:class:`ModelShape`. This package cannot import the trainer (the layers import downwards only), so
the workload arrives as plain data, and a rule stated once stays stated once; a test compares the
calls with those a real trainer makes, one by one.

What is this package's own: a call's size and cost. Forward, a group's call carries the
micro-batch's tokens of its input (contraction ``d_in``, uploaded once) and returns every member's
output (width: the sum of the members' ``d_out``); backward, the contraction is that sum and the
width ``d_in`` (the provider sums the members' input gradients: one download of ``d_in`` values a
token). The client's plaintext work (attention, the output head, LoRA) and model state come from
the shape's sizes.

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

import math
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from cipherswarm.fhe_backend.keys import SecretKey
from cipherswarm.fhe_backend.quant import Precision
from cipherswarm.fhe_backend.params import Params, WeightStats, choose_params
from cipherswarm.fhe_backend.shared_mask import SharedMaskKey
from cipherswarm.fhe_backend.verify import sketch_bytes

from ..client.keys import DEFAULT_PROFILE
from ..weights import Layer, group_key, load_model


@dataclass(frozen=True)
class LinearLayer:
    """One remote base layer: its module name and the engine's W shape (d_in x d_out)."""

    key: str
    d_in: int
    d_out: int


@dataclass(frozen=True)
class LayerGroup:
    """The layers multiplied as one: the column concatenation of `members` (d_in x sum of d_out)."""

    members: tuple[LinearLayer, ...]  # in column order, which is execution order

    def __post_init__(self) -> None:
        if not self.members or len({m.d_in for m in self.members}) != 1:
            raise ValueError(f"a group is one or more layers of one input width: {self.members}")

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
    def binding_macs(self) -> int:
        """MACs of binding a shared-mask key to this product's layer and direction (0 otherwise)."""
        return self.params.n * self.contraction * self.width if self.params.shared_mask else 0

    @property
    def bytes_in(self) -> int:
        return self.params.payload_bytes(self.tokens, self.contraction)

    @property
    def bytes_out(self) -> int:
        return self.params.result_bytes(self.tokens, self.width)


@dataclass(frozen=True)
class ModelShape:
    """A model as the simulator needs it: the executor calls of one training micro-batch, in the
    trainer's order, and the sizes of the client's plaintext rest. Made by the trainer from its own
    trace (``cipherswarm.trainer.workload.traced_model``, module docstring), not derived here."""

    name: str
    calls: tuple[tuple[LayerGroup, bool], ...]  # (group, transpose) of one training micro-batch, in order
    hidden: int
    n_layers: int
    vocab: int
    attn_width: int  # heads x head_dim: the width of attention scores' contraction
    lora_params: int  # trainable LoRA weights: the client's plaintext MACs per token forward, and its optimizer state
    n_layers_to_skip_for_backprop: int  # what the trainer planned with (the report states it)
    weights_dir: Path | None = None  # safetensors beside the config: exact parameters per group
    tied: bool = False  # the output head is the input embedding

    def __post_init__(self) -> None:
        first = {group.key: group for group, transpose in reversed(self.calls) if not transpose}
        for group, _ in self.calls:
            if first.get(group.key) != group:
                raise ValueError(f"{self.name}: {group.key} has no forward call, or another group has its key")

    @cached_property
    def groups(self) -> tuple[LayerGroup, ...]:
        """Every group called, once, in the order of its first forward call."""
        return tuple({group.key: group for group, transpose in self.calls if not transpose}.values())

    @cached_property
    def layers(self) -> tuple[LinearLayer, ...]:
        """Every remote layer, in the order of the groups."""
        return tuple(layer for group in self.groups for layer in group.members)


@dataclass(frozen=True)
class Workload:
    """Every encrypted product of a fine-tune, and the client's plaintext work."""

    model: ModelShape
    tokens: int  # training tokens in all
    micro_batch_tokens: int  # tokens per micro-batch (every call of a micro-batch has this many)
    seq_len: int  # tokens per sequence (attention spans one sequence)
    precision: Precision = Precision()
    profile: str = DEFAULT_PROFILE
    eval_batches: int = 0  # forward-only held-out micro-batches, evaluated before training and again after
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

    def client_memory(self, dtype_bytes: int = 2, binding_budget: int | None = None) -> dict[str, int]:
        """Bytes of model state a client holds to fine-tune this model remotely (activations aside),
        by the client's own rules: the frozen embeddings and head as stored (``dtype_bytes`` each),
        each remote layer's summary (node.weights.Layer), a Freivalds sketch and a key per group and
        direction, of the group's contraction and width (fhe_backend.verify, fhe_backend.keys; a
        shared-mask key holds its binding to the layer, fhe_backend.shared_mask), and
        the LoRA weights with their gradients and AdamW moments in float32. ``checkpoint`` is the
        whole checkpoint's size for comparison. A shared-mask key holds its binding only if the
        client keeps it within ``binding_budget`` bytes (every binding if None; kept_bindings)."""
        params: dict[tuple[str, bool], Params] = self._params  # type: ignore[attr-defined]
        kept = None if binding_budget is None else self.kept_bindings(binding_budget)
        m = self.model
        frozen = m.vocab * m.hidden * (1 if m.tied else 2)
        remote = sum(layer.d_in * layer.d_out for layer in m.layers)
        sketches = keys = 0
        for group in m.groups:
            for transpose in (False, True):
                p = params[group.key, transpose]
                contraction, width = (group.d_out, group.d_in) if transpose else (group.d_in, group.d_out)
                sketches += sketch_bytes(contraction, width, p)
                if not p.shared_mask:
                    keys += SecretKey.bytes_for(p)
                elif kept is None or (group.key, transpose) in kept:
                    keys += SharedMaskKey.bytes_for(p, contraction, width)
                else:
                    keys += SharedMaskKey.bytes_for(p, contraction, 0)  # the seed: bound for each call
        out = {
            "frozen": frozen * dtype_bytes,
            "summaries": sum(Layer.summary_size(layer.d_in, layer.d_out) for layer in m.layers),
            "sketches": sketches,
            "keys": keys,
            "lora": 4 * 4 * m.lora_params,  # weights, gradients, two AdamW moments
        }
        out["total"] = sum(out.values())
        out["checkpoint"] = (remote + frozen + (2 * m.n_layers + 1) * m.hidden) * dtype_bytes  # norms included
        out["remote_weights"] = remote
        return out

    def kept_bindings(self, budget: int) -> set[tuple[str, bool]]:
        """The (group key, transpose) whose key bindings a shared-mask client keeps within `budget`
        bytes, by its rule (node/client/keys.py): first come, first kept, in the order it prepares
        them (each group at its first call, its directions in call order)."""
        params: dict[tuple[str, bool], Params] = self._params  # type: ignore[attr-defined]
        order: dict[str, list[tuple[LayerGroup, bool]]] = {}
        for group, transpose in self.model.calls:
            if (group, transpose) not in order.setdefault(group.key, []):
                order[group.key].append((group, transpose))
        kept: set[tuple[str, bool]] = set()
        left = budget
        for group, transpose in (d for directions in order.values() for d in directions):
            p = params[group.key, transpose]
            if not p.shared_mask:
                continue
            size = SharedMaskKey.binding_bytes(p, group.d_in if transpose else group.d_out)
            if size <= left:
                kept.add((group.key, transpose))
                left -= size
        return kept

    def binding_macs(self, kept: set[tuple[str, bool]] | None = None) -> int:
        """MACs of binding the client's keys to the layers before the first call, Z = W^T S for
        each group and direction it calls and keeps (all by default; N token slots through the
        layer: fhe_backend/shared_mask.py); none but in the shared-mask profile."""
        params: dict[tuple[str, bool], Params] = self._params  # type: ignore[attr-defined]
        directions = {(g.key, transpose): Product(g, transpose, 0, params[g.key, transpose]) for g, transpose in self.model.calls}
        return sum(p.binding_macs for d, p in directions.items() if kept is None or d in kept)

    def products(self, tokens: int, *, backward: bool = True) -> list[Product]:
        """The calls of one micro-batch of `tokens`, in the order the trainer makes them (the shape's
        ``calls``, module docstring); without `backward`, its forward calls alone (held-out loss)."""
        params: dict[tuple[str, bool], Params] = self._params  # type: ignore[attr-defined]
        return [Product(g, transpose, tokens, params[g.key, transpose]) for g, transpose in self.model.calls
                if backward or not transpose]

    def client_macs(self, tokens: int, *, backward: bool = True) -> float:
        """Plaintext MACs of the client for a micro-batch: attention scores and values, the output
        head and LoRA (forward, and input gradients plus LoRA weight gradients backward)."""
        m = self.model
        attention = 2 * tokens * min(self.seq_len, tokens) * m.attn_width * m.n_layers / 2  # causal: half the pairs
        head = tokens * m.hidden * m.vocab
        lora = tokens * m.lora_params  # each LoRA weight: one MAC a token
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

