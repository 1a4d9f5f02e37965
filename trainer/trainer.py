"""LoRA fine-tuning where every frozen base matmul runs on someone else's machine, encrypted.

The client keeps everything small or private in the clear - LoRA weights, embeddings, norms,
attention, the output head, loss and optimizer - and sends each base layer's quantized input,
encrypted, to an executor (see :mod:`.executor`). The loop is one sitting: set up or resume ->
forward/backward per micro-batch -> clip and step -> evaluate -> log -> checkpoint.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cipherswarm.fhe_backend.quant import Precision

from .accuracy import AccuracyReport
from .checkpoint import capture_rng, checkpoint_folder, latest_checkpoint, load_state, restore_rng, save_checkpoint
from .errors import NoLoraLayersError, TrainingStopped
from .executor import ExecutorStatistics, LayerSpec, LocalExecutor, MatmulExecutor
from .layers import RemoteLinear
from .overlap import StepRunner
from .quantization import CPU_SECONDS, refresh_threads, torch_cpu
# The base layers' side (compile, modes, keys) is RemoteBaseLayers'; the batch helpers live with it
# and are importable from here as before.
from .batches import batch_loss, split_batch
from .remote import RemoteBaseLayers, check_int


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step: what was learned and what it cost the client.

    CPU seconds are ``time.process_time`` over the step (all threads of this process), less any
    in-process provider. ``cpu_parts`` names them, each measured in the thread that spent it:

    - quantize, dequantize: the per-token quantization around each product (trainer/quantization.py);
    - local: the rest of the training thread and torch's threads: autograd, non-linear ops, loss,
      optimizer;
    - encrypt, decrypt, verify, serialise, hash: the executor's crypto, wire conversion and SHA-256;
    - with a node client, its trio thread (node/cpu.py): noise, streams (yamux, framing, sockets),
      signatures, ledger, discovery, client_tasks (routing, dispatching), trio_scheduler; and
      handoff, the training thread's side of each call into it.

    ``cpu_unnamed_s`` is what no part claims (``cpu_s`` less their sum): small when every part is named.
    """

    step: int  # optimizer steps done, this one included
    epoch: int
    loss: float  # mean micro-batch loss of the step (before division for accumulation)
    lr: float  # learning rate the step used
    grad_norm: float  # global L2 norm of the trainable gradients before clipping
    tokens: int  # tokens that entered the step (attention_mask ones)
    wall_s: float
    cpu_s: float  # client CPU, in-process provider excluded
    cpu_encrypt_s: float
    cpu_decrypt_s: float
    cpu_verify_s: float
    cpu_wire_s: float  # serialising ciphertexts and parsing results
    cpu_plain_s: float  # the client's own plaintext work: quantize + dequantize + local (see above)
    provider_s: float  # CPU of a provider running in this process (0 when it runs elsewhere)
    remote_calls: int
    bytes_sent: int
    bytes_received: int
    eval: dict[str, float] | None = None
    cpu_parts: dict[str, float] | None = None  # CPU seconds by part (above); None in old checkpoints
    cpu_unnamed_s: float = 0.0


@dataclass(frozen=True)
class _CpuSnapshot:
    """Cumulative CPU figures at one moment, for a step's deltas (StepRecord's docstring)."""

    process: float  # time.process_time
    torch: float  # training thread + torch's native threads
    trainer: dict[str, float]  # quantization.CPU_SECONDS
    executor: ExecutorStatistics
    node: dict[str, float] | None  # a node client's hash and trio-thread parts; None for other executors

    @classmethod
    def take(cls, executor: object) -> "_CpuSnapshot":
        # No product is in flight between micro-batches: the two reads of the executor agree.
        stats = getattr(executor, "statistics", None)
        snap = stats() if stats is not None else None
        trio_cpu = getattr(snap, "trio_cpu", None)
        node = None if trio_cpu is None else {"hash": float(getattr(snap, "hash_s", 0.0)), **trio_cpu}
        return cls(time.process_time(), torch_cpu(), dict(CPU_SECONDS), ExecutorStatistics.of(executor), node)

    def parts_since(self, start: "_CpuSnapshot") -> tuple[float, ExecutorStatistics, dict[str, float]]:
        """(process CPU, executor statistics, named parts) from ``start`` to this snapshot."""
        st = self.executor - start.executor
        trainer = {k: v - start.trainer.get(k, 0.0) for k, v in self.trainer.items()}
        parts = {"quantize": trainer["quantize"], "dequantize": trainer["dequantize"],
                 "local": self.torch - start.torch - trainer["quantize"] - trainer["dequantize"] - trainer["executor"],
                 "encrypt": st.encrypt_s, "decrypt": st.decrypt_s, "verify": st.verify_s, "serialise": st.wire_s}
        if self.node is not None:
            before = start.node or {}
            parts.update({k: v - before.get(k, 0.0) for k, v in self.node.items()})
            parts["handoff"] = trainer["executor"]  # the training thread's side of the calls into the node's threads
        # else: a local executor's work runs in the training thread, inside its own statistics
        return self.process - start.process, st, parts


def _length(loader: Iterable) -> int | None:
    """Micro-batches per epoch, when the loader knows (an iterable-style DataLoader may not)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None


def _training_args(args: object) -> tuple[int, float | None]:
    """(gradient_accumulation_steps, max_grad_norm) from a dict or an object such as HF TrainingArguments."""
    known = ("gradient_accumulation_steps", "max_grad_norm")
    if args is None:
        args = {}
    if isinstance(args, Mapping):
        unknown = sorted(set(args) - set(known))
        if unknown:
            raise ValueError(f"unknown training_args {unknown}; supported: {list(known)}")
        get = args.get
    else:
        def get(name: str, default: Any = None) -> Any:
            return getattr(args, name, default)
    steps, norm = get("gradient_accumulation_steps", 1), get("max_grad_norm", None)
    check_int("gradient_accumulation_steps", steps)
    if norm is not None and not (isinstance(norm, (int, float)) and norm > 0 and math.isfinite(norm)):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {norm!r}")
    return steps, None if norm is None else float(norm)


StepHook = Callable[[int], str | None]
"""Asked with the optimizer steps done: a reason to stop training there (:class:`TrainingStopped`),
or None to go on (``LoraTrainer.train(stop_when=...)``)."""


@dataclass
class _Run:
    """State of one ``train`` call that checkpoints must capture or steps must see."""

    loader: Iterable
    executor: MatmulExecutor | None
    device: str | torch.device
    max_steps: int | None
    progress: bool
    epoch: int = 0
    done: int = 0  # micro-batches consumed in this epoch
    epoch_rng: dict | None = None  # RNG state at the start of this epoch (replays its data order)
    saved_at: tuple[int, int] | None = None  # (epoch, done) of the last checkpoint
    bytes_sent: int = 0  # by this call, for the progress bar
    stop_when: StepHook | None = None  # asked after each step but the last (train)


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as network rates are quoted)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


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
        self.gradient_accumulation_steps, self.max_grad_norm = _training_args(training_args)
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

    @property
    def executor(self) -> MatmulExecutor | None:
        """The default executor of ``fhe="remote"``."""
        return self._remote.executor

    @executor.setter
    def executor(self, executor: MatmulExecutor | None) -> None:
        self._remote.executor = executor

    @property
    def n_layers_to_skip_for_backprop(self) -> int:
        """Layers (execution order) that get no backward keys; read by ``compile()``."""
        return self._remote.n_layers_to_skip_for_backprop

    @n_layers_to_skip_for_backprop.setter
    def n_layers_to_skip_for_backprop(self, n: int) -> None:
        check_int("n_layers_to_skip_for_backprop", n, low=0)
        self._remote.n_layers_to_skip_for_backprop = n

    @property
    def remote_lm_head(self) -> bool:
        """Whether the output head runs remotely too; read by ``compile()``."""
        return self._remote.remote_lm_head

    @remote_lm_head.setter
    def remote_lm_head(self, value: bool) -> None:
        self._remote.remote_lm_head = value

    @property
    def accuracy(self) -> AccuracyReport | None:
        """Measured by ``compile()`` on its inputset (None before, or with ``check_accuracy=False``)."""
        return self._remote.accuracy

    @property
    def _local(self) -> dict[str, LocalExecutor]:
        """The in-process executors of "simulate" and "execute" (tests wrap or watch them)."""
        return self._remote.local_executors

    @property
    def _layers(self) -> dict[str, RemoteLinear]:
        """The remote layers by key, in module order."""
        return self._remote.layers

    @property
    def compiled(self) -> bool:
        """True once ``compile()`` made keys, until ``save_and_clear_private_info`` drops them."""
        return self._remote.compiled

    def compile(self, inputset: object, n_bits: int | None = None, *, precision: Precision | None = None,
                profile: str = "default", check_accuracy: bool = True, group_layers: bool = True) -> None:
        """Put remote layers in place, choose parameters, make keys and measure the quantized model's
        accuracy on ``inputset`` (the loss by this trainer's ``loss_fn``): :meth:`RemoteBaseLayers.compile`
        (``self.remote``) does it all, and its docstring says what each argument does."""
        self._remote.compile(inputset, n_bits, precision=precision, profile=profile, check_accuracy=check_accuracy,
                             group_layers=group_layers, loss_fn=self.loss_fn)
        self._log({"event": "compile", **self._remote.summary()})

    def layer_specs(self) -> dict[str, LayerSpec]:
        """Public description of every remote layer (weights, bits, directions), for building an executor."""
        return self._remote.layer_specs()

    # -- modes ----------------------------------------------------------------------------------

    @contextlib.contextmanager
    def fhe_mode(self, fhe: str = "execute", executor: MatmulExecutor | None = None) -> Iterator[MatmulExecutor | None]:
        """Within the block, every forward and backward of the model runs in mode ``fhe``.

        For inference or evaluation under encryption; ``train`` uses it too. Yields the executor.
        """
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

        ``fhe``: "disable" (plain float), "simulate" (the exact integer computation in the clear),
        "execute" (encrypted, products by an in-process provider, checked), "remote" (``executor``,
        or the constructor's, computes the products). ``resume_from_checkpoint``: a checkpoint
        folder, or True for the latest one in ``checkpoint_dir``. ``max_steps`` stops (and
        checkpoints) after that many optimizer steps in total. ``stop_when`` is asked, with the
        steps done, after every optimizer step but the last: a reason it returns ends training
        there with :class:`TrainingStopped`, after a checkpoint of that step (with a
        ``checkpoint_dir``, whatever ``save_steps`` says), so a stopped run loses nothing.
        """
        check_int("num_epochs", num_epochs)
        if max_steps is not None:
            check_int("max_steps", max_steps)
        with self.fhe_mode(fhe, executor) as active:
            self.model.to(device)
            self.model.train()
            run = _Run(loader=train_loader, executor=active, device=device, max_steps=max_steps, progress=progress,
                       stop_when=stop_when)
            now_rng = self._resume(resume_from_checkpoint, run) if resume_from_checkpoint else None
            if max_steps is not None and self.global_step >= max_steps:
                return
            self._log({"event": "train", "fhe": fhe, "epochs": num_epochs, "start_step": self.global_step,
                       "gradient_accumulation_steps": self.gradient_accumulation_steps, "max_grad_norm": self.max_grad_norm})
            for run.epoch in range(run.epoch, num_epochs):
                if run.epoch_rng is None:
                    run.epoch_rng = capture_rng(train_loader)
                else:
                    restore_rng(run.epoch_rng, train_loader)  # replay the resumed epoch's order ...
                batches = iter(train_loader)
                for _ in range(run.done):
                    next(batches, None)
                if now_rng is not None:
                    restore_rng(now_rng, train_loader)  # ... then go on from the checkpoint's state
                    now_rng = None
                if self._epoch(run, batches, num_epochs):
                    return
                run.epoch_rng, run.done = None, 0

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
        total = _length(run.loader)
        step: list[object] = []  # the micro-batches of the next optimizer step
        with tqdm(total=total, initial=run.done, desc=f"epoch {run.epoch + 1}/{num_epochs}", unit="batch",
                  disable=not run.progress, dynamic_ncols=True) as bar:
            for batch in batches:
                step.append(batch)
                if len(step) == ga or run.done + len(step) == total:
                    if self._step(run, step, bar):
                        return True
                    step = []
            if step and self._step(run, step, bar):
                return True
        if self.checkpoint_dir is not None and self.save_steps is None and run.done:
            self._save(run)
        return False

    def _loss(self, batch: object, device: str | torch.device) -> tuple[torch.Tensor, int]:
        """Loss of one batch and its number of real tokens."""
        ids, mask, labels = split_batch(batch)
        ids, labels = ids.to(device), labels.to(device)
        mask = None if mask is None else mask.to(device)
        loss = batch_loss(self.model, ids, mask, labels, self.loss_fn)
        tokens = int(mask.sum()) if mask is not None else ids.numel()
        return loss, tokens

    def _step(self, run: "_Run", batches: list[object], bar: tqdm) -> bool:
        """One optimizer step over ``batches``, its micro-batches ``micro_batches_in_flight`` at
        once (:mod:`.overlap`), their gradients added up in order. True: ``max_steps`` reached."""
        refresh_threads()
        start = (time.perf_counter(), _CpuSnapshot.take(run.executor))

        def taken(_: int) -> None:
            run.done += 1
            bar.update(1)

        context = self._remote.context
        previous = context.executor
        with self._steps.executor(previous) as turn_taking:
            context.executor = turn_taking
            try:
                results = self._steps.run(batches, partial(self._micro_step, device=run.device), taken)
            finally:
                context.executor = previous
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

    def _finish_step(self, run: "_Run", group: list[tuple[float, int]],
                     start: tuple[float, _CpuSnapshot | None], bar: tqdm) -> bool:
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
        wall0, cpu0 = start
        assert cpu0 is not None  # taken with the group's first micro-batch
        wall = time.perf_counter() - wall0
        cpu, st, parts = _CpuSnapshot.take(run.executor).parts_since(cpu0)
        record = StepRecord(
            step=self.global_step + 1, epoch=run.epoch, loss=sum(l for l, _ in group) / len(group), lr=lr,
            grad_norm=grad_norm, tokens=sum(t for _, t in group), wall_s=wall, cpu_s=cpu - st.provider_s,
            cpu_encrypt_s=st.encrypt_s, cpu_decrypt_s=st.decrypt_s, cpu_verify_s=st.verify_s, cpu_wire_s=st.wire_s,
            cpu_plain_s=parts["quantize"] + parts["dequantize"] + parts["local"], provider_s=st.provider_s,
            remote_calls=st.calls, bytes_sent=st.bytes_sent, bytes_received=st.bytes_received,
            cpu_parts={k: round(v, 6) for k, v in parts.items()}, cpu_unnamed_s=cpu - st.provider_s - sum(parts.values()),
        )
        if self.eval_loader is not None and record.step % self.eval_steps == 0:
            record = replace(record, eval=self.evaluate())
        self._records.append(record)
        run.bytes_sent += record.bytes_sent
        bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{record.tokens / max(wall, 1e-9):.1f}",
                        sent=human_bytes(run.bytes_sent), refresh=False)
        if record.step % self.logging_steps == 0 or record.eval is not None:
            self._log({"event": "step", **asdict(record)})
        stop = run.max_steps is not None and record.step >= run.max_steps
        if self.checkpoint_dir is not None and (stop or (self.save_steps is not None and record.step % self.save_steps == 0)):
            self._save(run)
        reason = None if stop or run.stop_when is None else run.stop_when(self.global_step)
        if reason is not None:
            checkpoint = None
            if self.checkpoint_dir is not None:
                self._save(run)  # once per position: a no-op when save_steps just took it
                checkpoint = checkpoint_folder(self.checkpoint_dir, self.global_step)
            raise TrainingStopped(reason, step=self.global_step, checkpoint=checkpoint)
        return stop

    # -- evaluation -----------------------------------------------------------------------------

    def evaluate(self, eval_loader: Iterable | None = None, fhe: str | None = None,
                 executor: MatmulExecutor | None = None) -> dict[str, float]:
        """Mean loss over ``eval_loader`` (default: the constructor's), plus ``eval_metric_fn``'s metrics.

        Runs in the current mode unless ``fhe`` names another.
        """
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

    # -- checkpoints, results, private info -----------------------------------------------------

    def _save(self, run: "_Run") -> None:
        """Checkpoint after ``run.done`` micro-batches of ``run.epoch`` (once per position)."""
        if run.saved_at == (run.epoch, run.done):
            return
        state = {
            "global_step": self.global_step, "epoch": run.epoch, "batches_done": run.done,
            "records": [asdict(r) for r in self._records],
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.lr_scheduler is None else self.lr_scheduler.state_dict(),
            "rng_epoch_start": run.epoch_rng, "rng_now": capture_rng(run.loader),
            "config": {"gradient_accumulation_steps": self.gradient_accumulation_steps},
            "model_digest": self._model_digest(),
        }
        folder = save_checkpoint(checkpoint_folder(self.checkpoint_dir, self.global_step), self.model, state)
        run.saved_at = (run.epoch, run.done)
        self._log({"event": "checkpoint", "step": self.global_step, "path": str(folder)})

    def _resume(self, where: str | Path | bool, run: "_Run") -> dict:
        """Load a checkpoint into model, optimizer, scheduler, records and ``run``; return its RNG state."""
        if where is True:
            if self.checkpoint_dir is None:
                raise ValueError("resume_from_checkpoint=True needs checkpoint_dir")
            folder = latest_checkpoint(self.checkpoint_dir)
        else:
            folder = Path(where)  # type: ignore[arg-type]
        state = load_state(folder)
        saved_model = state.get("model_digest")
        if saved_model is not None and saved_model != self._model_digest():
            raise ValueError(f"the checkpoint {folder} was trained against other base weights (its layers' quantization digests "
                             "differ from this model's): resume with the model it was trained on")
        saved_ga = state["config"]["gradient_accumulation_steps"]
        if saved_ga != self.gradient_accumulation_steps:
            raise ValueError(f"the checkpoint used gradient_accumulation_steps={saved_ga}, this trainer "
                             f"{self.gradient_accumulation_steps}: steps would not line up")
        loaded = set_peft_model_state_dict(self.model, load_file(folder / "adapter_model.safetensors"))
        if loaded.unexpected_keys:
            raise ValueError(f"the checkpoint's adapters do not fit this model: {loaded.unexpected_keys[:3]} ...")
        self.optimizer.load_state_dict(state["optimizer"])
        if self.lr_scheduler is not None and state["scheduler"] is not None:
            self.lr_scheduler.load_state_dict(state["scheduler"])
        self._records = [StepRecord(**r) for r in state["records"]]
        run.epoch, run.done, run.epoch_rng = state["epoch"], state["batches_done"], state["rng_epoch_start"]
        run.saved_at = (run.epoch, run.done)
        self._log({"event": "resume", "step": self.global_step, "path": str(folder)})
        return state["rng_now"]

    def _model_digest(self) -> str:
        """SHA-256 over every remote layer's key and quantization digest: binds a checkpoint to its base weights."""
        return self._remote.digest()

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
        self._log({"event": "saved_and_cleared", "path": str(path)})

    def _log(self, entry: dict[str, Any]) -> None:
        """Append one JSON line to the training log (readable with ``json.loads`` per line)."""
        if self.train_log_path is None:
            return
        self.train_log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.train_log_path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
