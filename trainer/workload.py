"""The simulator's workload, planned by the trainer's own code on a model without weights.

``cipherswarm estimate`` and bench/simulate.py simulate fine-tunes of models this machine cannot
hold (LLaMA-3-8B, -70B). What they replay - which base layers run remotely, which of them are
multiplied as one group, the order in which a training micro-batch calls the executor, which groups
get a backward product - is what a real fine-tune would do, so it is found the way a real fine-tune
finds it: the model is built from its config on the meta device (shapes, no storage), given the
LoRA adapters ``finetune`` gives it (:func:`~.finetune.with_lora`), and planned by
:meth:`~.remote.RemoteBaseLayers.plan`, the part of ``compile`` that needs no weight values (trace,
unread layers, backprop skip, groups). Its calls go to ``cipherswarm.node.sim`` as plain data, a
:class:`~cipherswarm.node.sim.workload.ModelShape`: the simulator sits below the trainer and
cannot ask it, and holds no rule of the trainer's. tests/trainer/test_workload.py checks the plan
against the calls a compiled trainer makes in a real step, one by one.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from transformers import AutoConfig

from cipherswarm.node.sim.workload import LayerGroup, LinearLayer, ModelShape

from .finetune import FinetuneConfig, with_lora
from .remote import RemoteBaseLayers
from .tasks import task_of_config

LLAMA_3_8B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}
"""meta-llama/Meta-Llama-3-8B's config.json, the fields that decide the workload."""

LLAMA_3_70B: dict[str, Any] = {
    "model_type": "llama", "num_hidden_layers": 80, "hidden_size": 8192, "intermediate_size": 28672,
    "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False,
}
"""meta-llama/Meta-Llama-3-70B's config.json, the fields that decide the workload."""

TRACE_TOKENS = 4
"""Tokens of the traced sequence: which layers run, in what order, on what, does not depend on them."""


def traced_model(source: str | Path | Mapping[str, Any], *, name: str | None = None,
                 lora_r: int = FinetuneConfig.lora_r, target_modules: Sequence[str] | None = FinetuneConfig.target_modules,
                 n_layers_to_skip_for_backprop: int = FinetuneConfig.n_layers_to_skip_for_backprop) -> ModelShape:
    """The simulator's view of fine-tuning ``source`` (a model directory, its ``config.json``, or a
    config's fields such as :data:`LLAMA_3_8B`) with LoRA of rank ``lora_r`` on ``target_modules``
    (None: peft's default, as ``finetune``'s) and ``n_layers_to_skip_for_backprop``: planned by the
    trainer on the meta device (module docstring). ``name``: the shape's name (by default the
    directory's, or "model"). A directory holding safetensors is the shape's ``weights_dir``, from
    which the simulator takes each group's exact parameters. Raises what ``compile`` would: an
    unsupported model (:class:`~.tasks.UnsupportedModelError`), a skip that loses a gradient
    (:class:`~.errors.BackpropSkipError`)."""
    weights_dir = None
    if isinstance(source, Mapping):
        fields = dict(source)
    else:
        path = Path(source)
        config_file = path / "config.json" if path.is_dir() else path
        fields = json.loads(config_file.read_text())
        name = name or config_file.parent.name
        weights_dir = config_file.parent if any(config_file.parent.glob("*.safetensors")) else None
    task = task_of_config(fields, name or "the config")
    config = AutoConfig.for_model(**fields)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' and peft's notes on building and adapting: an estimate's noise
        with torch.device("meta"):
            model = task.auto_class.from_config(config)
            model = with_lora(model, task, r=lora_r, alpha=FinetuneConfig.lora_alpha, targets=target_modules)
        remote = RemoteBaseLayers(model, n_layers_to_skip_for_backprop=n_layers_to_skip_for_backprop)
        calls = remote.plan(torch.zeros(1, TRACE_TOKENS, dtype=torch.long), loss_fn=task.loss_fn)
    groups = {key: LayerGroup(tuple(LinearLayer(m.key, m.in_features, m.out_features) for m in group.members))
              for key, group in remote.groups.items()}
    base = remote.base_model
    embeddings = base.get_input_embeddings().weight
    head = base.get_output_embeddings()
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ModelShape(
        name=name or "model", calls=tuple((groups[call.key], call.transpose) for call in calls),
        hidden=embeddings.shape[1], n_layers=config.num_hidden_layers, vocab=embeddings.shape[0], attn_width=heads * head_dim,
        lora_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        n_layers_to_skip_for_backprop=n_layers_to_skip_for_backprop, weights_dir=weights_dir,
        tied=head is not None and head.weight is embeddings,
    )
