"""LoRA fine-tuning where every frozen base matmul runs on someone else's machine, encrypted.

The client keeps everything small or private in the clear - LoRA weights, embeddings, norms,
attention, the output head, loss and optimizer - and sends each base layer's quantized input,
encrypted, to an executor (see :mod:`.executor`). The loop is one sitting: set up or resume ->
forward/backward per micro-batch -> clip and step -> evaluate -> log -> checkpoint.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from tqdm.auto import tqdm

from cipherswarm.fhe_backend.quant import Precision

from . import checkpoint
from .arguments import read_training_args
from .batches import batch_loss, loader_length, split_batch
from .errors import NoLoraLayersError, TrainingStopped
from .executor import LayerSpec, MatmulExecutor
from .log import log_event, progress_bar, show_step
from .overlap import StepRunner
from .quantization import refresh_threads
from .records import CpuSnapshot, StepRecord, measure_step
from .remote import RemoteBaseLayers, check_int


def _forwarded(name: str, doc: str, *, settable: bool = True, check: Callable[[str, Any], None] | None = None) -> property:
    """A ``LoraTrainer`` property that is its RemoteBaseLayers' attribute ``name``: one object holds
    the base layers' settings, whichever loop set them (``check`` validates what is set)."""
    def set_(trainer: "LoraTrainer", value: Any) -> None:
        if check is not None:
            check(name, value)
        setattr(trainer.remote, name, value)
    return property(lambda trainer: getattr(trainer.remote, name), set_ if settable else None, doc=doc)


StepHook = Callable[[int], str | None]
"""Asked with the optimizer steps done: a reason to stop training there (:class:`TrainingStopped`),
or None to go on (``LoraTrainer.train(stop_when=...)``)."""


@dataclass(kw_only=True)
class _Run(checkpoint.Position):
    """State of one ``train`` call: its position in the data (what checkpoints capture) and what steps see."""

    executor: MatmulExecutor | None
    device: str | torch.device
    max_steps: int | None
    progress: bool
    bytes_sent: int = 0  # by this call, for the progress bar
    stop_when: StepHook | None = None  # asked after each step but the last (train)


class LoraTrainer:
    """Fine-tunes a peft LoRA model while its frozen base layers run encrypted on providers.

    Arguments follow Concrete ML's ``LoraTrainer`` (1.8/1.9). Additions, keyword-only: ``save_steps``
    (checkpoint every that many optimizer steps; by default at each epoch end), ``remote_lm_head``
    (run the output head remotely too), ``executor`` (the default for ``fhe="remote"``) and
    ``micro_batches_in_flight``: with gradient accumulation, how many micro-batches of one optimizer
    step run at once, so that one's products travel while another computes (:mod:`.overlap`; the
    results are those of one at a time, bit for bit; each one in flight holds its own activations).

    What concerns the base layers - ``compile``, ``layer_specs``, ``fhe_mode``, the keys - is done by
    its :class:`~.remote.RemoteBaseLayers` (``trainer.remote``), the same that
    :func:`~.remote.remote_base_layers` gives any other training loop.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        lr_scheduler: Any = None,
        training_args: Mapping[str, Any] | object | None = None,
        n_layers_to_skip_for_backprop: int = 1,
        eval_loader: Iterable | None = None,
        eval_metric_fn: Callable[[torch.nn.Module, Iterable], Mapping[str, float] | float] | None = None,
        logging_steps: int = 1,
        eval_steps: int = 10,
        train_log_path: str | Path | None = "training.log",
        checkpoint_dir: str | Path | None = None,
        *,
        save_steps: int | None = None,
        remote_lm_head: bool = False,
        executor: MatmulExecutor | None = None,
        micro_batches_in_flight: int = 2,
    ) -> None:
        if not isinstance(model, PeftModel):
            raise TypeError("model must be a peft PeftModel: wrap it with peft.get_peft_model(model, LoraConfig(...))")
        if not any(isinstance(m, LoraLayer) for m in model.modules()):
            raise NoLoraLayersError("the model has no LoRA layer; give peft.get_peft_model a LoraConfig with target_modules")
        check_int("n_layers_to_skip_for_backprop", n_layers_to_skip_for_backprop, low=0)
        check_int("logging_steps", logging_steps)
        check_int("eval_steps", eval_steps)
        if save_steps is not None:
            check_int("save_steps", save_steps)
        check_int("micro_batches_in_flight", micro_batches_in_flight)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps, self.max_grad_norm = read_training_args(training_args)
        self.eval_loader = eval_loader
        self.eval_metric_fn = eval_metric_fn
        self.logging_steps = logging_steps
        self.eval_steps = eval_steps
        self.train_log_path = None if train_log_path is None else Path(train_log_path)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.save_steps = save_steps
        self._steps = StepRunner(micro_batches_in_flight)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        # The base layers: remote layers, trace, specs, keys, modes (remote.py, shared with any other loop)
        self._remote = RemoteBaseLayers(model, n_layers_to_skip_for_backprop=n_layers_to_skip_for_backprop,
                                        remote_lm_head=remote_lm_head, executor=executor)
        self._records: list[StepRecord] = []

    # -- the base layers (RemoteBaseLayers) --------------------------------------------------------

    @property
    def remote(self) -> RemoteBaseLayers:
        """The model's base layers and their modes (remote.py): what ``compile`` and ``fhe_mode`` act on."""
        return self._remote

    executor = _forwarded("executor", "The default executor of ``fhe=\"remote\"``.")
    n_layers_to_skip_for_backprop = _forwarded("n_layers_to_skip_for_backprop", "Layers (execution order) that get no "
                                               "backward keys; read by ``compile()``.", check=partial(check_int, low=0))
    remote_lm_head = _forwarded("remote_lm_head", "Whether the output head runs remotely too; read by ``compile()``.")
    accuracy = _forwarded("accuracy", "Measured by ``compile()`` on its inputset (None before, or with "
                          "``check_accuracy=False``): an :class:`AccuracyReport`.", settable=False)
    compiled = _forwarded("compiled", "True once ``compile()`` made keys, until ``save_and_clear_private_info`` "
                          "drops them.", settable=False)
    _local = _forwarded("local_executors", "The in-process executors of \"simulate\" and \"execute\" (tests wrap or "
                        "watch them).", settable=False)
    _layers = _forwarded("layers", "The remote layers by key, in module order.", settable=False)

    def compile(self, inputset: object, n_bits: int | None = None, *, precision: Precision | None = None,
                profile: str = "default", check_accuracy: bool = True, group_layers: bool = True) -> None:
        """Put remote layers in place, choose parameters, make keys and measure the quantized model's
        accuracy on ``inputset`` (the loss by this trainer's ``loss_fn``): :meth:`RemoteBaseLayers.compile`
        (``self.remote``) does it all, and its docstring says what each argument does."""
        self._remote.compile(inputset, n_bits, precision=precision, profile=profile, check_accuracy=check_accuracy,
                             group_layers=group_layers, loss_fn=self.loss_fn)
        log_event(self.train_log_path, {"event": "compile", **self._remote.summary()})

    def layer_specs(self) -> dict[str, LayerSpec]:
        """Public description of every remote layer (weights, bits, directions), for building an executor."""
        return self._remote.layer_specs()

    @contextlib.contextmanager
    def fhe_mode(self, fhe: str = "execute", executor: MatmulExecutor | None = None) -> Iterator[MatmulExecutor | None]:
        """Within the block, every forward and backward of the model runs in mode ``fhe`` (evaluation or
        inference under encryption; ``train`` uses it too). Yields the executor."""
        with self._remote.mode(fhe, executor) as chosen:
            yield chosen

    # -- training -------------------------------------------------------------------------------

    def train(
        self,
        train_loader: Iterable,
        num_epochs: int = 1,
        fhe: str = "simulate",
        device: str | torch.device = "cpu",
        *,
        executor: MatmulExecutor | None = None,
        resume_from_checkpoint: str | Path | bool | None = None,
        max_steps: int | None = None,
        progress: bool = True,
        stop_when: StepHook | None = None,
    ) -> None:
        """Train for ``num_epochs`` epochs (in total, counting those a resumed checkpoint already did).

        ``fhe``: "disable" (plain float), "simulate" (the exact integer computation in the clear), "execute"
        (encrypted, products by an in-process provider, checked), "remote" (``executor``, or the
        constructor's, computes the products). ``resume_from_checkpoint``: a checkpoint folder, or True for
        the latest in ``checkpoint_dir`` (:mod:`.checkpoint`). ``max_steps`` stops (and checkpoints) after
        that many optimizer steps in total. ``stop_when`` is asked, with the steps done, after every step
        but the last: a reason it returns ends training there with :class:`TrainingStopped`, after a
        checkpoint of that step (with a ``checkpoint_dir``, whatever ``save_steps`` says).
        """
        check_int("num_epochs", num_epochs)
        if max_steps is not None:
            check_int("max_steps", max_steps)
        with self.fhe_mode(fhe, executor) as active:
            self.model.to(device)
            self.model.train()
            run = _Run(loader=train_loader, executor=active, device=device, max_steps=max_steps, progress=progress,
                       stop_when=stop_when)
            rng_now = None
            if resume_from_checkpoint:
                self._records, rng_now = checkpoint.resume(self, resume_from_checkpoint, run)
            if max_steps is not None and self.global_step >= max_steps:
                return
            log_event(self.train_log_path, {"event": "train", "fhe": fhe, "epochs": num_epochs, "start_step": self.global_step,
                                            "gradient_accumulation_steps": self.gradient_accumulation_steps,
                                            "max_grad_norm": self.max_grad_norm})
            for run.epoch in range(run.epoch, num_epochs):
                if self._epoch(run, checkpoint.epoch_batches(run, rng_now), num_epochs):
                    return
                run.epoch_rng, run.done, rng_now = None, 0, None

    @property
    def global_step(self) -> int:
        """Optimizer steps done so far, those of a resumed checkpoint included."""
        return len(self._records)

    def _epoch(self, run: "_Run", batches: Iterator, num_epochs: int) -> bool:
        """The rest of one epoch; True when ``max_steps`` was reached.

        The end of an epoch is known from ``len(loader)`` where there is one, not by reading ahead:
        a checkpoint must be taken after exactly the micro-batches it says were consumed.
        """
        ga = self.gradient_accumulation_steps
        total = loader_length(run.loader)
        step: list[object] = []  # the micro-batches of the next optimizer step
        with progress_bar(total, done=run.done, epoch=run.epoch, num_epochs=num_epochs, enabled=run.progress) as bar:
            for batch in batches:
                step.append(batch)
                if len(step) == ga or run.done + len(step) == total:
                    if self._step(run, step, bar):
                        return True
                    step = []
            if step and self._step(run, step, bar):
                return True
        if self.checkpoint_dir is not None and self.save_steps is None and run.done:
            checkpoint.save(self, run)
        return False

    def _loss(self, batch: object, device: str | torch.device) -> tuple[torch.Tensor, int]:
        """Loss of one batch and its number of real tokens."""
        ids, mask, labels = split_batch(batch)
        mask = None if mask is None else mask.to(device)
        loss = batch_loss(self.model, ids.to(device), mask, labels.to(device), self.loss_fn)
        return loss, int(mask.sum()) if mask is not None else ids.numel()

    def _step(self, run: "_Run", batches: list[object], bar: tqdm) -> bool:
        """One optimizer step over ``batches``, its micro-batches ``micro_batches_in_flight`` at
        once (:mod:`.overlap`), their gradients added up in order. True: ``max_steps`` reached."""
        refresh_threads()
        start = CpuSnapshot.take(run.executor)

        def taken(_: int) -> None:
            run.done += 1
            bar.update(1)

        with self._steps.taking_turns(self._remote.context):
            results = self._steps.run(batches, partial(self._micro_step, device=run.device), taken)
        for _, _, grads in results:
            for p, g in zip(self._trainable, grads):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad.add_(g)
        return self._finish_step(run, [(loss, tokens) for loss, tokens, _ in results], start, bar)

    def _micro_step(self, batch: object, device: str | torch.device) -> tuple[float, int, tuple[torch.Tensor | None, ...]]:
        """One micro-batch: its loss, real tokens, and the gradients of its share of the step's loss."""
        loss, tokens = self._loss(batch, device)
        if not loss.requires_grad:
            raise RuntimeError("the loss does not depend on any trainable weight: are the LoRA adapters active?")
        grads = torch.autograd.grad(loss / self.gradient_accumulation_steps, self._trainable, allow_unused=True)
        return float(loss.detach()), tokens, grads

    def _finish_step(self, run: "_Run", group: list[tuple[float, int]], start: CpuSnapshot, bar: tqdm) -> bool:
        """Clip, step, record, evaluate, log and checkpoint as configured. True: ``max_steps`` reached."""
        ga = self.gradient_accumulation_steps
        if len(group) < ga:
            # An epoch's last, short group: its gradients were divided by ga, so rescale to a mean.
            for p in self._trainable:
                if p.grad is not None:
                    p.grad.mul_(ga / len(group))
        grads = [p.grad for p in self._trainable if p.grad is not None]
        if self.max_grad_norm is not None:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(self._trainable, self.max_grad_norm))
        else:
            grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0
        lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.step()
        if self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = measure_step(start, run.executor, step=self.global_step + 1, epoch=run.epoch, group=group, lr=lr,
                              grad_norm=grad_norm)
        if self.eval_loader is not None and record.step % self.eval_steps == 0:
            record = replace(record, eval=self.evaluate())
        self._records.append(record)
        run.bytes_sent += record.bytes_sent
        show_step(bar, record, run.bytes_sent)
        if record.step % self.logging_steps == 0 or record.eval is not None:
            log_event(self.train_log_path, {"event": "step", **asdict(record)})
        stop = run.max_steps is not None and record.step >= run.max_steps
        if self.checkpoint_dir is not None and (stop or (self.save_steps is not None and record.step % self.save_steps == 0)):
            checkpoint.save(self, run)
        reason = None if stop or run.stop_when is None else run.stop_when(self.global_step)
        if reason is not None:  # checkpointed first (once per position: a no-op when save_steps just took it)
            folder = None if self.checkpoint_dir is None else checkpoint.save(self, run)
            raise TrainingStopped(reason, step=self.global_step, checkpoint=folder)
        return stop

    def evaluate(self, eval_loader: Iterable | None = None, fhe: str | None = None,
                 executor: MatmulExecutor | None = None) -> dict[str, float]:
        """Mean loss over ``eval_loader`` (default: the constructor's), plus ``eval_metric_fn``'s metrics;
        in the current mode unless ``fhe`` names another."""
        loader = self.eval_loader if eval_loader is None else eval_loader
        if loader is None:
            raise ValueError("no eval_loader: pass one here or to the constructor")
        mode = contextlib.nullcontext() if fhe is None else self.fhe_mode(fhe, executor)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            with mode, torch.no_grad():
                losses = [float(self._loss(batch, device)[0]) for batch in loader]
                metrics = {"eval_loss": sum(losses) / max(len(losses), 1)}
                if self.eval_metric_fn is not None:
                    extra = self.eval_metric_fn(self.model, loader)
                    metrics.update(extra if isinstance(extra, Mapping) else {"eval_metric": float(extra)})
        finally:
            self.model.train(was_training)
        return metrics

    # -- results, private info ------------------------------------------------------------------

    def get_training_losses(self) -> list[float]:
        """Loss of every optimizer step so far (resumed steps included)."""
        return [r.loss for r in self._records]

    @property
    def step_records(self) -> tuple[StepRecord, ...]:
        """Every optimizer step's loss, timings, CPU split and bytes."""
        return tuple(self._records)

    def save_and_clear_private_info(self, path: str | Path) -> None:
        """Save the adapters (peft ``save_pretrained``) to ``path``, then forget every secret.

        Keys and checkers are dropped (the remote executor's too, if it has ``clear_private_info``)
        and the model gets its original layers back; training again needs ``compile()``.
        """
        self.model.save_pretrained(path)
        self._remote.clear_private_info()
        log_event(self.train_log_path, {"event": "saved_and_cleared", "path": str(path)})
