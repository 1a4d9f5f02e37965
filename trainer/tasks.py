"""What a model directory is fine-tuned as, decided up front from its ``config.json``.

``finetune`` and ``cipherswarm train`` fine-tune two kinds of model, each with its own model class,
loss and data:

- a **causal LM** (``...ForCausalLM``, ``...LMHeadModel``): next-token cross-entropy
  (:func:`~.batches.causal_lm_loss`) on text, prompt/completion or chat records;
- a **sentence encoder** (a bare encoder such as ``BertModel``, or an encoder's masked-LM
  checkpoint; all-MiniLM-L6-v2 and the other sentence-transformers models are these): the
  mean-pooled contrastive loss with in-batch negatives (:func:`~.batches.mean_pooled_contrastive_loss`)
  on anchor/positive records. Mean pooling reads the last hidden state only, so the pooler's
  product is never sent out (``RemoteBaseLayers.compile`` leaves layers the loss does not read on
  the client).

Anything else (a classification or question-answering head, an encoder-decoder, a vision model)
is refused before anything is loaded, with :class:`UnsupportedModelError` saying what to use
instead: the Python API (``LoraTrainer`` or ``remote_base_layers``) takes any model and loss.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModel, AutoModelForCausalLM
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES, MODEL_MAPPING_NAMES

from .batches import causal_lm_loss, mean_pooled_contrastive_loss
from .errors import TrainerError

CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")
ENCODER_SUFFIXES = ("ForMaskedLM", "ForPreTraining")  # an encoder checkpoint whose head is for pretraining only


class UnsupportedModelError(TrainerError, ValueError):
    """The model directory holds a kind of model that ``finetune`` has no loss and data for."""


@dataclass(frozen=True)
class Task:
    """How one kind of model is loaded, adapted and trained."""

    name: str
    auto_class: type  # the transformers Auto class that builds it
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    peft_task_type: str  # LoraConfig's task_type
    pairs: bool  # trains on anchor/positive records (trainer/data.py)
    generates: bool  # greedy samples before and after fine-tuning make sense


CAUSAL_LM = Task("causal-lm", AutoModelForCausalLM, causal_lm_loss, "CAUSAL_LM", pairs=False, generates=True)
SENTENCE_EMBEDDING = Task("sentence-embedding", AutoModel, mean_pooled_contrastive_loss, "FEATURE_EXTRACTION",
                          pairs=True, generates=False)


def task_of(model_dir: str | Path) -> Task:
    """The task of the model in ``model_dir`` (module docstring), from its config's
    ``architectures`` and ``model_type``; :class:`UnsupportedModelError` for any other model."""
    config_file = Path(model_dir) / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"{model_dir} has no config.json: give a Hugging Face model folder (save_pretrained)")
    return task_of_config(json.loads(config_file.read_text()), str(model_dir))


def task_of_config(config: Mapping[str, Any], model_dir: str = "the config") -> Task:
    """:func:`task_of` for the fields of a ``config.json`` (``model_dir``: where it is, for messages)."""
    model_type = config.get("model_type", "")
    architectures = config.get("architectures") or []
    encoder = model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES and not config.get("is_decoder", False)
    if any(a.endswith(CAUSAL_SUFFIXES) for a in architectures) and not encoder:
        return CAUSAL_LM
    if encoder and all(a == MODEL_MAPPING_NAMES.get(model_type) or a.endswith(ENCODER_SUFFIXES) for a in architectures):
        return SENTENCE_EMBEDDING
    if not architectures and model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not encoder:
        return CAUSAL_LM
    raise UnsupportedModelError(
        f"{model_dir} holds a {model_type or 'model of unknown type'} model ({', '.join(architectures) or 'no architectures'}); "
        "finetune and `cipherswarm train` fine-tune causal language models (...ForCausalLM: next-token loss on text, "
        "prompt/completion or chat data) and sentence encoders (a bare encoder such as BertModel: mean-pooled contrastive "
        "loss on anchor/positive pairs). For another head, train with the Python API - LoraTrainer or "
        "remote_base_layers with your own loss_fn (trainer/README.md) - or save the bare encoder "
        "(AutoModel.from_pretrained(dir).save_pretrained(new_dir)) to fine-tune its sentence embeddings")
