"""A GGUF file (llama.cpp's format, how many pretrained models are shared) as a Hugging Face checkpoint.

Nodes and the trainer read safetensors directories: providers map one tensor at a time, a thin
client reads summaries and single layers from them. A GGUF model is therefore converted once:
transformers dequantizes its tensors (the ``gguf`` package does the block formats, Q4_1 and
friends), and the model, its config and tokenizer are saved with ``save_pretrained``. The weights
are the dequantized values exactly when ``dtype`` is float32 (the default), so a client and its
providers that convert the same file get the same model hash.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .errors import TrainerError


class GgufError(TrainerError, ValueError):
    """The file cannot be converted; the message says why."""


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, *, dtype: torch.dtype = torch.float32) -> Path:
    """Write the causal LM of ``gguf_path`` to ``out_dir`` as safetensors, config and tokenizer.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion leaves nothing that looks like a model. Returns ``out_dir``.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise GgufError(f"{path} is not a file")
    if out.exists():
        raise GgufError(f"{out} exists; convert into a new folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ImportError, ValueError, KeyError, OSError) as exc:  # no gguf package, unknown architecture, bad file
        hint = " (pip install cipherswarm[gguf])" if isinstance(exc, ImportError) else ""
        raise GgufError(f"{path}: {exc}{hint}") from exc
    # the loaded model is plain tensors; the quantizer marker only stops save_pretrained
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    partial = out.with_name(out.name + ".partial")
    model.save_pretrained(partial, safe_serialization=True)
    tokenizer.save_pretrained(partial)
    os.replace(partial, out)
    return out
