"""A ready fine-tune: LoRA on a Hugging Face causal LM and plain-text files, in any fhe mode.

This is what ``cipherswarm train`` and ``cipherswarm testnet`` run, and what the examples call:
load the model and tokenizer from a local directory (for ``fhe="remote"`` without its base
weights, which stay on disk: ``thin.load_remote_model``), cut the text into fixed-length sequences, wrap
the model with peft LoRA, build a :class:`LoraTrainer` and train for a number of optimizer steps,
measuring held-out loss before and after. Defaults are the bundled tiny Shakespeare LLaMA and its
fine-tuning set, so it runs offline out of the box.

With a checkpoint folder, a fine-tune survives a crash: the trainer checkpoints every few steps, and
the folder's ``finetune.json`` records the config, the mode and the held-out loss measured before
training, so a resumed run continues at the saved step with the same losses and the same "before"
figure, and refuses to continue a different config's checkpoints.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from cipherswarm.fhe_backend.quant import Precision
from cipherswarm.node.weights import ModelWeights, load_model

from .checkpoint import latest_checkpoint, load_state
from .data import Batch, DataError, load_examples
from .errors import TrainerError
from .executor import MatmulExecutor
from .thin import load_remote_model
from .batches import causal_lm_loss
from .trainer import LoraTrainer, StepRecord

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "tiny-shakespeare-llama"
BUNDLED_DATA = ASSETS / "finetune"
RUN_FILE = "finetune.json"  # in a checkpoint folder: the config, mode and "before" loss of its run


class ResumeError(TrainerError, ValueError):
    """A checkpoint folder that does not fit the asked run: resuming would mix two fine-tunes, or
    starting afresh would mix its checkpoints with an earlier run's."""


@dataclass
class FinetuneConfig:
    """Everything that decides a fine-tune's result (two runs with one config give the same losses)."""

    model_dir: Path = BUNDLED_MODEL  # HF causal LM directory (safetensors + tokenizer)
    data_dir: Path = BUNDLED_DATA  # a data folder or file (trainer/data.py): text, or JSONL text/prompt-completion/chat
    steps: int = 20  # optimizer steps
    seq_len: int = 128  # tokens per sequence
    batch_size: int = 16  # sequences per micro-batch: 16 x 128 tokens fill one 2048-token ring block
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    lr: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    forward_bits: int = Precision.forward_bits  # activation bits of the encrypted products
    backward_bits: int = Precision.backward_bits  # gradient bits
    weight_bits: int = Precision.weight_bits  # base weight bits: the providers' must be the same
    n_layers_to_skip_for_backprop: int = 1
    eval_batches: int = 2  # held-out micro-batches for the loss before and after
    seed: int = 0
    profile: str = "default"  # encryption profile of fhe="execute"

    @property
    def precision(self) -> Precision:
        """The bit widths as one value (validated)."""
        return Precision(self.forward_bits, self.backward_bits, self.weight_bits)


@dataclass
class FinetuneResult:
    """What a fine-tune produced and what it cost."""

    config: FinetuneConfig
    fhe: str
    losses: list[float]
    records: list[StepRecord]
    eval_before: float
    eval_after: float
    wall_s: float  # this sitting's seconds plus the recorded step times of the steps it resumed after
    trainer: LoraTrainer = field(repr=False)
    resumed_at: int = 0  # optimizer steps done by earlier sittings (0: not resumed)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)


def _batches(examples: Batch, batch_size: int, generator: torch.Generator | None) -> list[Batch]:
    count = len(examples["input_ids"])
    if count < batch_size:
        raise DataError(f"{count} example(s) do not fill one micro-batch of {batch_size}: lower --batch-size")
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    return [{k: v[order[i : i + batch_size]] for k, v in examples.items()} for i in range(0, count - batch_size + 1, batch_size)]


def build(config: FinetuneConfig, *, checkpoint_dir: Path | None = None, save_steps: int | None = None,
          thin: ModelWeights | None = None, in_flight: int = 2) -> tuple[LoraTrainer, list[Batch], list[Batch]]:
    """The trainer (compiled) and its training and held-out micro-batches, all seeded by ``config.seed``.

    ``checkpoint_dir`` and ``save_steps`` go to the trainer (checkpoints every ``save_steps`` steps
    and when the last step is done). ``thin``: the model's layer summaries; the model is then
    loaded without its base weights (``load_remote_model``), for ``fhe="remote"`` and "disable".
    ``in_flight``: micro-batches of one step at once (LoraTrainer's ``micro_batches_in_flight``;
    the results do not depend on it, so it is not part of the config)."""
    if not Path(config.model_dir).is_dir():
        raise FileNotFoundError(f"model_dir {config.model_dir} is not a directory")
    if not Path(config.data_dir).exists():
        raise FileNotFoundError(f"data_dir {config.data_dir} does not exist")
    torch.manual_seed(config.seed)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    tokenizer = AutoTokenizer.from_pretrained(config.model_dir)
    tokenizer.model_max_length = 1 << 30  # whole files are tokenized at once, then cut into sequences
    if thin is None:
        model = AutoModelForCausalLM.from_pretrained(config.model_dir, dtype=torch.float32)
    else:
        model, _ = load_remote_model(config.model_dir, thin)
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                      target_modules=list(config.target_modules), task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)
    train, valid = load_examples(config.data_dir, tokenizer, config.seq_len)
    gen = torch.Generator().manual_seed(config.seed)
    needed = config.steps * config.gradient_accumulation_steps
    train_batches: list[Batch] = []
    while len(train_batches) < needed:  # as many shuffled epochs as the steps need
        train_batches += _batches(train, config.batch_size, gen)
    eval_batches = _batches(valid, min(config.batch_size, len(valid["input_ids"])), None)[: config.eval_batches]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr)
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, config.steps) / config.steps)))
    trainer = LoraTrainer(
        model=model, optimizer=optimizer, loss_fn=causal_lm_loss, lr_scheduler=schedule,
        training_args={"gradient_accumulation_steps": config.gradient_accumulation_steps,
                       "max_grad_norm": config.max_grad_norm},
        n_layers_to_skip_for_backprop=config.n_layers_to_skip_for_backprop,
        eval_loader=eval_batches, train_log_path=None, checkpoint_dir=checkpoint_dir, save_steps=save_steps,
        micro_batches_in_flight=in_flight,
    )
    trainer.compile(train_batches[0], precision=config.precision, profile=config.profile)
    return trainer, train_batches[:needed], eval_batches


def _run_record(config: FinetuneConfig, fhe: str) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the config (folders resolved) and the mode."""
    values = asdict(config)
    for name in ("model_dir", "data_dir"):
        values[name] = str(Path(values[name]).resolve())
    return {"config": json.loads(json.dumps(values)), "fhe": fhe}  # tuples as lists, as the file holds them


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'name: saved -> wanted' for each config field or mode in which two run records differ."""
    pairs = {**{k: (saved["config"].get(k), v) for k, v in wanted["config"].items()}, "fhe": (saved["fhe"], wanted["fhe"])}
    return [f"{name}: {old!r} -> {new!r}" for name, (old, new) in pairs.items() if old != new]


def _latest(checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from; None when the run stopped before its first one."""
    try:
        return latest_checkpoint(checkpoint_dir)
    except FileNotFoundError:
        return None


def open_run(checkpoint_dir: Path, config: FinetuneConfig, fhe: str, *, resume: bool) -> float | None:
    """Check that ``checkpoint_dir`` fits the run; the held-out loss before training when resuming.

    Resuming needs the folder's run record, with the same config and mode. Starting afresh needs a
    folder without one: the trainer resumes from the highest step, which could be an older run's.
    """
    path = Path(checkpoint_dir) / RUN_FILE
    if not resume:
        if path.exists() or _latest(checkpoint_dir) is not None:
            raise ResumeError(f"{checkpoint_dir} holds the checkpoints of an earlier fine-tune: resume it "
                              "(resume=True; cipherswarm train --resume), or use another folder")
        return None
    if not path.is_file():
        raise ResumeError(f"nothing to resume in {checkpoint_dir}: it has no {RUN_FILE} (start without resuming)")
    saved = json.loads(path.read_text())
    changed = _differences(saved, _run_record(config, fhe))
    if changed:
        raise ResumeError(f"the checkpoints in {checkpoint_dir} are of another fine-tune ({'; '.join(changed)}): "
                          "resume with the same options, or use another folder")
    return float(saved["eval_before"])


def _write_run(checkpoint_dir: Path, config: FinetuneConfig, fhe: str, eval_before: float) -> None:
    """Record the run before its first checkpoint, atomically (a torn file must not block resuming)."""
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    path = Path(checkpoint_dir) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**_run_record(config, fhe), "eval_before": eval_before}, indent=2) + "\n")
    os.replace(tmp, path)


def finetune(
    config: FinetuneConfig,
    *,
    fhe: str = "execute",
    executor: MatmulExecutor | None = None,
    progress: bool = True,
    on_trainer: Callable[[LoraTrainer], None] | None = None,
    checkpoint_dir: Path | None = None,
    save_steps: int = 1,
    resume: bool = False,
    in_flight: int = 2,
) -> FinetuneResult:
    """Run ``config`` in mode ``fhe`` (``executor`` for "remote"); held-out loss is measured in the
    same mode before and after. ``on_trainer`` sees the trainer before training starts (live views).

    ``checkpoint_dir``: checkpoint there every ``save_steps`` optimizer steps and after the last;
    ``resume`` continues the run recorded there at its latest checkpoint (:class:`ResumeError` if
    the folder belongs to another config), with the losses of an uninterrupted run. ``in_flight``:
    micro-batches of one optimizer step at once (same results; see ``build``).
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    before = None if checkpoint_dir is None else open_run(checkpoint_dir, config, fhe, resume=resume)
    thin = None
    if fhe == "remote":  # the client holds no base weight: the executor's summaries if it has them
        shared = getattr(executor, "weights", None)
        thin = shared if isinstance(shared, ModelWeights) else load_model(config.model_dir, hold=False,
                                                                            weight_bits=config.weight_bits)
    trainer, train_batches, eval_batches = build(config, checkpoint_dir=checkpoint_dir,
                                                 save_steps=None if checkpoint_dir is None else save_steps, thin=thin,
                                                 in_flight=in_flight)
    if on_trainer is not None:
        on_trainer(trainer)
    t0 = time.perf_counter()
    if before is None:
        before = trainer.evaluate(eval_batches, fhe=fhe, executor=executor)["eval_loss"]
        if checkpoint_dir is not None:
            _write_run(checkpoint_dir, config, fhe, before)
    resume_from = _latest(checkpoint_dir) if resume and checkpoint_dir is not None else None
    trainer.train(train_batches, num_epochs=1, fhe=fhe, executor=executor, max_steps=config.steps, progress=progress,
                  resume_from_checkpoint=resume_from)
    after = trainer.evaluate(eval_batches, fhe=fhe, executor=executor)["eval_loss"]
    records = list(trainer.step_records)
    resumed_at = 0 if resume_from is None else int(load_state(resume_from)["global_step"])
    wall = time.perf_counter() - t0 + sum(r.wall_s for r in records[:resumed_at])
    return FinetuneResult(config=config, fhe=fhe, losses=trainer.get_training_losses(), records=records,
                          eval_before=before, eval_after=after, wall_s=wall, trainer=trainer, resumed_at=resumed_at)
