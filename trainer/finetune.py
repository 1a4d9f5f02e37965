"""A ready fine-tune: LoRA on a Hugging Face causal LM and plain-text files, in any fhe mode.

This is what ``cipherswarm train`` and ``cipherswarm testnet`` run, and what the examples call:
load the model and tokenizer from a local directory, cut the text into fixed-length sequences, wrap
the model with peft LoRA, build a :class:`LoraTrainer` and train for a number of optimizer steps,
measuring held-out loss before and after. Defaults are the bundled tiny Shakespeare LLaMA and its
fine-tuning set, so it runs offline out of the box.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from .executor import MatmulExecutor
from .trainer import LoraTrainer, StepRecord, causal_lm_loss

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "tiny-shakespeare-llama"
BUNDLED_DATA = ASSETS / "finetune"


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tune's result (two runs with one config give the same losses)."""

    model_dir: Path = BUNDLED_MODEL  # HF causal LM directory (safetensors + tokenizer)
    data_dir: Path = BUNDLED_DATA  # holds train.txt and valid.txt
    steps: int = 20  # optimizer steps
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 16  # sequences per micro-batch: 16 x 128 tokens fill one 2048-token ring block
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    n_bits: int = 8  # activation bits of the encrypted layers
    n_layers_to_skip_for_backprop: int = 1
    eval_batches: int = 2  # held-out micro-batches for the loss before and after
    seed: int = 0
    profile: str = "default"  # encryption profile of fhe="execute"


@dataclass
class FinetuneResult:
    """What a fine-tune produced and what it cost."""

    config: FinetuneConfig
    fhe: str
    losses: list[float]
    records: list[StepRecord]
    eval_before: float
    eval_after: float
    wall_s: float
    trainer: LoraTrainer = field(repr=False)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)


def text_sequences(path: Path, tokenizer, seq_len: int) -> torch.Tensor:
    """Token ids of a text file cut into consecutive (count, seq_len) sequences (the tail dropped)."""
    ids = tokenizer(path.read_text(encoding="utf-8"), return_attention_mask=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise ValueError(f"{path} holds {len(ids)} tokens, fewer than one sequence of {seq_len}")
    return torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)


def _batches(seqs: torch.Tensor, batch_size: int, generator: torch.Generator | None) -> list[torch.Tensor]:
    order = torch.randperm(len(seqs), generator=generator) if generator is not None else torch.arange(len(seqs))
    return [seqs[order[i : i + batch_size]] for i in range(0, len(seqs) - batch_size + 1, batch_size)]


def build(config: FinetuneConfig) -> tuple[LoraTrainer, list[torch.Tensor], list[torch.Tensor]]:
    """The trainer (compiled) and its training and held-out micro-batches, all seeded by ``config.seed``."""
    for name in ("model_dir", "data_dir"):
        path = Path(getattr(config, name))
        if not path.is_dir():
            raise FileNotFoundError(f"{name} {path} is not a directory")
    torch.manual_seed(config.seed)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    tokenizer.model_max_length = 1 << 30  # whole files are tokenized at once, then cut into sequences
    model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    train = text_sequences(Path(config.data_dir) / "train.txt", tokenizer, config.seq_len)
    valid = text_sequences(Path(config.data_dir) / "valid.txt", tokenizer, config.seq_len)
    gen = torch.Generator().manual_seed(config.seed)
    needed = config.steps * config.gradient_accumulation_steps
    train_batches: list[torch.Tensor] = []
    while len(train_batches) < needed:  # as many shuffled epochs as the steps need
        train_batches += _batches(train, config.batch_size, gen)
    eval_batches = _batches(valid, config.batch_size, None)[: config.eval_batches]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    trainer = LoraTrainer(
        model=model, optimizer=optimizer, loss_fn=causal_lm_loss, lr_scheduler=schedule,
        training_args={"gradient_accumulation_steps": config.gradient_accumulation_steps,
                       "max_grad_norm": config.max_grad_norm},
        n_layers_to_skip_for_backprop=config.n_layers_to_skip_for_backprop,
        eval_loader=eval_batches, train_log_path=None,
    )
    trainer.compile(train_batches[0], n_bits=config.n_bits, profile=config.profile)
    return trainer, train_batches[:needed], eval_batches


def finetune(
    config: FinetuneConfig,
    *,
    fhe: str = "execute",
    executor: MatmulExecutor | None = None,
    progress: bool = True,
    on_trainer: Callable[[LoraTrainer], None] | None = None,
) -> FinetuneResult:
    """Run ``config`` in mode ``fhe`` (``executor`` for "remote"); held-out loss is measured in the
    same mode before and after. ``on_trainer`` sees the trainer before training starts (live views)."""
    trainer, train_batches, eval_batches = build(config)
    if on_trainer is not None:
        on_trainer(trainer)
    t0 = time.perf_counter()
    before = trainer.evaluate(eval_batches, fhe=fhe, executor=executor)["eval_loss"]
    trainer.train(train_batches, num_epochs=1, fhe=fhe, executor=executor, max_steps=config.steps, progress=progress)
    after = trainer.evaluate(eval_batches, fhe=fhe, executor=executor)["eval_loss"]
    return FinetuneResult(config=config, fhe=fhe, losses=trainer.get_training_losses(), records=list(trainer.step_records),
                          eval_before=before, eval_after=after, wall_s=time.perf_counter() - t0, trainer=trainer)
