"""A ready fine-tune: LoRA on a Hugging Face causal LM or sentence encoder and data files, in any fhe mode.

This is what ``cipherswarm train`` and ``cipherswarm testnet`` run, and what the examples call:
decide from the model's config what it is trained as (:mod:`.tasks`: a causal LM on text, or a
sentence encoder on pairs; any other model is refused up front), load the model and tokenizer
from a local directory (for ``fhe="remote"`` without its base weights, which stay on disk:
``thin.load_remote_model``), read the data (:mod:`.data`), wrap the model with peft LoRA, build a
:class:`LoraTrainer` and train for a number of optimizer steps, measuring held-out loss before and
after. A causal LM also writes greedy continuations of a few held-out prompts before and after
(:func:`samples`), so a person sees what the fine-tune changed. Defaults are the bundled tiny
Shakespeare LLaMA and its fine-tuning set, so it runs offline out of the box.

With a checkpoint folder, a fine-tune survives a crash: the trainer checkpoints every few steps, and
the folder's ``finetune.json`` records the config, the mode and the held-out loss measured before
training, so a resumed run continues at the saved step with the same losses and the same "before"
figure, and refuses to continue a different config's checkpoints (:mod:`.checkpoint` keeps that
record, as it keeps the checkpoints' format).
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import AutoTokenizer
from transformers.utils import logging as hf_logging

from cipherswarm.fhe_backend.quant import Precision
from cipherswarm.node.weights import ModelWeights, load_model

from .checkpoint import latest_or_none, open_run, steps_done, write_run
from .data import Batch, DataError, load_examples
from .errors import ResumeError, TrainingStopped  # noqa: F401  # ResumeError: what open_run raises, importable here as before
from .executor import MatmulExecutor
from .thin import load_remote_model
from .batches import IGNORE_INDEX
from .tasks import Task, UnsupportedModelError, task_of
from .records import StepRecord
from .trainer import LoraTrainer, StepHook

ASSETS = Path(__file__).resolve().parent / "assets"
BUNDLED_MODEL = ASSETS / "tiny-shakespeare-llama"
BUNDLED_DATA = ASSETS / "finetune"
SAMPLE_PROMPTS = 3  # held-out examples whose greedy continuation is shown before and after fine-tuning
SAMPLE_TOKENS = 24  # new tokens of each
TEXT_PROMPT_TOKENS = 16  # a text example's prompt: its first tokens (other kinds: all before the first learned token)
SAMPLES_EXECUTOR = "disable"  # samples are generated in plaintext here: the encrypted path adds nothing to what they show


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
    target_modules: tuple[str, ...] | None = None  # None: peft's choice for the architecture (LLaMA q_proj/v_proj, BERT query/value)
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
    task: str = "causal-lm"  # what the model was trained as (tasks.py)
    samples: list[dict[str, str]] | None = None  # a causal LM's greedy samples: prompt, before, after

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.records)


def _batches(examples: Batch, batch_size: int, generator: torch.Generator | None) -> list[Batch]:
    """Micro-batches of ``batch_size`` examples, shuffled by ``generator`` (None: in order). A pair
    example (rows of shape (2, seq_len), trainer/data.py) gives two rows: a micro-batch holds its
    anchors, then their positives in the same order, as the contrastive loss reads them."""
    count = len(examples["input_ids"])
    if count < batch_size:
        raise DataError(f"{count} example(s) do not fill one micro-batch of {batch_size}: lower --batch-size")
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)

    def rows(v: torch.Tensor) -> torch.Tensor:
        return v.transpose(0, 1).flatten(0, 1) if v.ndim == 3 else v

    return [{k: rows(v[order[i : i + batch_size]]) for k, v in examples.items()} for i in range(0, count - batch_size + 1, batch_size)]


def target_modules(requested: Sequence[str] | None, model: torch.nn.Module) -> list[str]:
    """The modules that get adapters: those ``requested`` (FinetuneConfig.target_modules), or with
    None peft's default for the architecture."""
    if requested is not None:
        return list(requested)
    model_type = getattr(model.config, "model_type", "")
    default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    if not default:
        raise UnsupportedModelError(f"peft names no default LoRA target modules for {model_type!r} models: "
                                    "give them (--target-modules, FinetuneConfig.target_modules)")
    return list(default)


def with_lora(model: torch.nn.Module, task: Task, *, r: int, alpha: int, targets: Sequence[str] | None) -> PeftModel:
    """``model`` with the LoRA adapters of a fine-tune: rank ``r``, scale ``alpha``, no dropout, on
    ``targets`` (None: peft's default for the architecture). The simulator's workload is planned on
    adapters made here too (:mod:`.workload`), so that it has the fine-tune's trainable inputs."""
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules(targets, model),
                      task_type=task.peft_task_type)
    return get_peft_model(model, lora)


def load_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer, for whole files: they are tokenized at once, then cut into sequences."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.model_max_length = 1 << 30
    return tokenizer


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
    task = task_of(config.model_dir)  # before anything is loaded: an unsupported model fails here
    if task.pairs and config.batch_size < 2:
        raise DataError(f"a sentence encoder's micro-batch needs 2 pairs at least (one is the other's negative), "
                        f"got --batch-size {config.batch_size}")
    torch.manual_seed(config.seed)
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    tokenizer = load_tokenizer(config.model_dir)
    train, valid = load_examples(config.data_dir, tokenizer, config.seq_len, pairs=task.pairs)
    if thin is None:
        model = task.auto_class.from_pretrained(config.model_dir, dtype=torch.float32)
    else:
        model, _ = load_remote_model(config.model_dir, thin, auto_class=task.auto_class)
    model = with_lora(model, task, r=config.lora_r, alpha=config.lora_alpha, targets=config.target_modules)
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
        model=model, optimizer=optimizer, loss_fn=task.loss_fn, lr_scheduler=schedule,
        training_args={"gradient_accumulation_steps": config.gradient_accumulation_steps,
                       "max_grad_norm": config.max_grad_norm},
        n_layers_to_skip_for_backprop=config.n_layers_to_skip_for_backprop,
        eval_loader=eval_batches, train_log_path=None, checkpoint_dir=checkpoint_dir, save_steps=save_steps,
        micro_batches_in_flight=in_flight,
    )
    trainer.compile(train_batches[0], precision=config.precision, profile=config.profile)
    return trainer, train_batches[:needed], eval_batches


def sample_prompts(batches: list[Batch], count: int = SAMPLE_PROMPTS) -> list[torch.Tensor]:
    """The prompts of the first ``count`` held-out examples: the tokens before the first one the
    model learns to write (a completion's, an assistant turn's), or a text example's first
    :data:`TEXT_PROMPT_TOKENS`."""
    prompts = []
    for batch in batches:
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"]):
            learned = ((labels != IGNORE_INDEX) & (mask == 1)).nonzero()
            start = int(learned[0]) if len(learned) else int(mask.sum())
            prompts.append(ids[: start if start > 0 else TEXT_PROMPT_TOKENS])
            if len(prompts) == count:
                return prompts
    return prompts


def samples(trainer: LoraTrainer, tokenizer: Any, prompts: list[torch.Tensor], max_new_tokens: int = SAMPLE_TOKENS) -> list[str]:
    """The greedy continuation of each prompt by the model as it is now (its LoRA adapter as
    trained so far), decoded. Computed in mode :data:`SAMPLES_EXECUTOR` - plaintext, in this
    process - since the samples show what the adapter learned, not the encryption, and encrypted
    generation would cost a round trip per token; a model loaded without its base weights reads
    each layer from disk for it."""
    model = trainer.model
    was_training = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    out = []
    try:
        with trainer.fhe_mode(SAMPLES_EXECUTOR), torch.no_grad():
            for prompt in prompts:
                ids = prompt.unsqueeze(0)
                generated = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                           do_sample=False, pad_token_id=pad)
                out.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    finally:
        model.train(was_training)
    return out


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
    on_step: StepHook | None = None,
) -> FinetuneResult:
    """Run ``config`` in mode ``fhe`` (``executor`` for "remote"); held-out loss is measured in the
    same mode before and after, and a causal LM's greedy samples (:func:`samples`, plaintext here)
    of the first held-out prompts too. ``on_trainer`` sees the trainer before training starts (live views).

    ``checkpoint_dir``: checkpoint there every ``save_steps`` optimizer steps and after the last;
    ``resume`` continues the run recorded there at its latest checkpoint (:class:`ResumeError` if
    the folder belongs to another config), with the losses of an uninterrupted run. ``in_flight``:
    micro-batches of one optimizer step at once (same results; see ``build``).

    ``on_step`` (:data:`StepHook`) is asked before this sitting's first step, once the held-out loss
    before is known, and after every step but the last; a reason it returns ends the run there with
    :class:`TrainingStopped`, after a checkpoint of that step (``checkpoint_dir`` given), without the
    evaluation after or the samples: it is how ``cipherswarm train --budget`` stops before overspending.
    """
    if resume and checkpoint_dir is None:
        raise ValueError("resume=True needs the checkpoint_dir of the run to continue")
    task = task_of(config.model_dir)  # an unsupported model is refused before the weights are read
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
    tokenizer = load_tokenizer(config.model_dir)
    prompts = sample_prompts(eval_batches) if task.generates else []
    samples_before = samples(trainer, tokenizer, prompts)  # LoRA as initialised: the base model's own
    t0 = time.perf_counter()
    if before is None:
        before = trainer.evaluate(eval_batches, fhe=fhe, executor=executor)["eval_loss"]
        if checkpoint_dir is not None:
            write_run(checkpoint_dir, config, fhe, before)
    resume_from = latest_or_none(checkpoint_dir) if resume and checkpoint_dir is not None else None
    resumed_at = steps_done(resume_from)
    if on_step is not None and (reason := on_step(resumed_at)) is not None:
        raise TrainingStopped(reason, step=resumed_at, checkpoint=resume_from)
    trainer.train(train_batches, num_epochs=1, fhe=fhe, executor=executor, max_steps=config.steps, progress=progress,
                  resume_from_checkpoint=resume_from, stop_when=on_step)
    after = trainer.evaluate(eval_batches, fhe=fhe, executor=executor)["eval_loss"]
    records = list(trainer.step_records)
    wall = time.perf_counter() - t0 + sum(r.wall_s for r in records[:resumed_at])
    shown = [{"prompt": tokenizer.decode(prompt, skip_special_tokens=True), "before": old, "after": new}
             for prompt, old, new in zip(prompts, samples_before, samples(trainer, tokenizer, prompts))]
    return FinetuneResult(config=config, fhe=fhe, losses=trainer.get_training_losses(), records=records,
                          eval_before=before, eval_after=after, wall_s=wall, trainer=trainer, resumed_at=resumed_at,
                          task=task.name, samples=shown if task.generates else None)
