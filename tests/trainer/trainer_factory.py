"""Tiny random-init Hugging Face models under peft LoRA, built from configs (nothing downloaded)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.utils import logging as hf_logging

from cipherswarm.cli.localswarm import start_provider
from cipherswarm.trainer import LoraTrainer, causal_lm_loss

hf_logging.set_verbosity_error()  # tiny configs trip harmless warnings about GPT-2's special token ids

VOCAB = 128
PROVIDER_START_S = 120.0  # a provider process imports torch, quantizes and benchmarks, on busy cores


@dataclass(frozen=True)
class Arch:
    """One model family: how to build it and the largest valid backprop skip for its LoRA targets."""

    name: str
    build: Callable[[], torch.nn.Module]
    lora: Callable[[], LoraConfig]
    skip: int  # layers before the first LoRA-dependent input, in execution order
    remote_layers: int  # frozen base Linear/Conv1D layers, the output head aside


def _llama() -> torch.nn.Module:
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, vocab_size=VOCAB, max_position_embeddings=64)
    return LlamaForCausalLM(cfg)


def _gpt2() -> torch.nn.Module:
    # Dropout stays on (GPT-2's default 0.1): it makes training consume random numbers, which the
    # resume test must reproduce.
    return GPT2LMHeadModel(GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64))


LLAMA = Arch("llama", _llama, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                   init_lora_weights=False), skip=3, remote_layers=14)
GPT2 = Arch("gpt2", _gpt2, lambda: LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True,
                                               init_lora_weights=False), skip=1, remote_layers=8)
ARCHS = [LLAMA, GPT2]


def base_model(arch: Arch, seed: int = 0) -> torch.nn.Module:
    """The plain HF model; the same weights for the same seed."""
    torch.manual_seed(seed)
    return arch.build()


def peft_model(arch: Arch, seed: int = 0, lora_seed: int | None = None) -> PeftModel:
    """The same base weights for a given seed; LoRA weights random (non-zero B) from ``lora_seed``."""
    base = base_model(arch, seed)
    torch.manual_seed(seed if lora_seed is None else lora_seed)
    return get_peft_model(base, arch.lora())


def make_trainer(arch: Arch, *, seed: int = 0, lr: float = 1e-2, **kwargs) -> LoraTrainer:
    """A trainer over a fresh model with AdamW; ``kwargs`` go to LoraTrainer."""
    model = peft_model(arch, seed, kwargs.pop("lora_seed", None))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    kwargs.setdefault("n_layers_to_skip_for_backprop", arch.skip)
    kwargs.setdefault("train_log_path", None)
    return LoraTrainer(model=model, optimizer=opt, **kwargs)


def lora_trainer(model: torch.nn.Module, arch: Arch) -> LoraTrainer:
    """A trainer with SGD (lr 0.1) and seeded LoRA over ``model``, a loaded or thin copy of ``arch``."""
    torch.manual_seed(3)
    peft = get_peft_model(model, arch.lora())
    opt = torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.1)
    return LoraTrainer(model=peft, optimizer=opt, loss_fn=causal_lm_loss, n_layers_to_skip_for_backprop=arch.skip,
                       train_log_path=None)


def token_data(n: int, tokens: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, tokens), generator=g)


def lora_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


@contextlib.contextmanager
def provider_process(tmp_path: Path, model_dir: Path | None = None) -> Iterator[tuple[Path, str]]:
    """A `cipherswarm provider` process on loopback serving `model_dir` (by default the tiny LLaMA,
    saved under `tmp_path`): (model folder, its multiaddr). Stopped on exit."""
    if model_dir is None:
        model_dir = tmp_path / "model"
        base_model(LLAMA).save_pretrained(model_dir, safe_serialization=True)
    # Started as the testnet starts its providers; a short start-up benchmark, one BLAS thread.
    provider = start_provider(0, model=model_dir, run_dir=tmp_path, price=0, benchmark_s=0.1, env={"OMP_NUM_THREADS": "1"})
    try:
        yield model_dir, provider.wait_addr(PROVIDER_START_S)
    finally:
        provider.stop()
