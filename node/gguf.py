"""A GGUF file (llama.cpp's format, how many pretrained models are shared) as a Hugging Face checkpoint.

Nodes and the trainer read safetensors directories: providers map one tensor at a time, a thin
client reads summaries and single layers from them. A GGUF model is therefore converted once:
transformers dequantizes its tensors (the ``gguf`` package does the block formats, Q4_1 and
friends), and the model, its config and tokenizer are saved with ``save_pretrained``. The weights
are the dequantized values exactly in float32, so a client and its providers that convert the same
file get the same model hash. ``model_dir`` is what ``--model`` goes through: a folder is used as it
is, a .gguf file is converted once into a cache folder named by the file's SHA-256.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from .identity import home_dir
from .weights import WeightsError


class GgufError(WeightsError, ValueError):
    """The file cannot be converted; the message says why."""


def model_dir(path: str | Path, *, cache: Path | None = None) -> Path:
    """``path`` if it is a folder; for a .gguf file, its conversion in ``cache`` (default
    ~/.cipherswarm/models), made on first use. WeightsError for anything else."""
    path = Path(path)
    if path.is_dir():
        return path
    if not (path.is_file() and path.suffix == ".gguf"):
        raise WeightsError(f"{path} is neither a model folder (safetensors) nor a .gguf file")
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    out = (cache or home_dir() / "models") / f"{path.stem}-{digest.hexdigest()[:16]}"
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_gguf(path, out)


def convert_gguf(gguf_path: str | Path, out_dir: str | Path) -> Path:
    """Write the causal LM of ``gguf_path`` to ``out_dir`` as float32 safetensors, config and tokenizer.

    The folder is written under a temporary name and renamed when complete, so an interrupted
    conversion leaves nothing that looks like a model. Returns ``out_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, out = Path(gguf_path), Path(out_dir)
    if not path.is_file():
        raise GgufError(f"{path} is not a file")
    if out.exists():
        raise GgufError(f"{out} exists; convert into a new folder")
    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
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
