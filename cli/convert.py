"""Convert a GGUF model file (llama.cpp's format) into a Hugging Face checkpoint folder.

    cipherswarm convert SmolLM2-135M-Instruct.Q4_1.gguf models/smollm2
    cipherswarm provider --model models/smollm2 ...        # and clients train with --model models/smollm2

Providers and clients read safetensors folders; the folder written here holds the dequantized
weights in float32 (so everyone who converts the same file gets the same model hash), the config
and the tokenizer. Needs the `gguf` extra (pip install 'cipherswarm[gguf]').
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("gguf", type=Path, help="the .gguf file")
    p.add_argument("out", type=Path, help="folder to create (must not exist)")


def run(args: argparse.Namespace) -> int:
    from cipherswarm.node.gguf import convert_gguf

    out = convert_gguf(args.gguf, args.out)
    files = sorted(p.name for p in out.iterdir())
    print(f"wrote {out}: {', '.join(files)}")
    return 0
