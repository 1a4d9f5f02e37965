"""The Python API end to end in one short script: a provider process, an encrypted fine-tune through
it, then the adapters loaded back with peft to generate text.

    python examples/python_api.py [--steps 4]
"""

from __future__ import annotations

import argparse
import subprocess
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipherswarm.node import SwarmClient
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, finetune


def start_provider() -> tuple[subprocess.Popen, str]:
    """One provider on loopback; it prints its multiaddr once it serves."""
    proc = subprocess.Popen([sys.executable, "-m", "cipherswarm.cli", "provider", "--model", str(BUNDLED_MODEL),
                             "--log-level", "WARNING"], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if "/p2p/" in line:
            return proc, line.strip()
    raise RuntimeError("the provider exited before serving")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--out", default="runs/example-api/adapter")
    args = ap.parse_args()
    provider, addr = start_provider()
    try:
        config = FinetuneConfig(steps=args.steps)
        with SwarmClient(model_dir=config.model_dir, bootstrap=[addr]) as client:
            result = finetune(config, fhe="remote", executor=client, progress=False)
        print(f"encrypted fine-tune: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
              f"held-out {result.eval_before:.4f} -> {result.eval_after:.4f}")
        result.trainer.save_and_clear_private_info(args.out)  # adapters saved, keys forgotten
    finally:
        provider.terminate()
        provider.wait()

    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL), args.out)
    torch.manual_seed(0)
    ids = model.generate(**tokenizer("PROSPERO:\n", return_tensors="pt"), max_new_tokens=40, do_sample=True, top_k=20)
    print(tokenizer.decode(ids[0], skip_special_tokens=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
