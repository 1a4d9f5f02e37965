"""LoRA fine-tuning where every frozen base matmul runs on someone else's machine, encrypted.

The client keeps everything small or private in the clear - LoRA weights, embeddings, norms,
attention, the output head, loss and optimizer - and sends each base layer's quantized input,
encrypted, to an executor (see :mod:`.executor`). The loop is one sitting: set up or resume ->
forward/backward per micro-batch -> clip and step -> evaluate -> log -> checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file
from tqdm.auto import tqdm

from cipherswarm.fhe_backend.quant import MAX_X_BITS, MIN_X_BITS, Precision, check_bits

from .accuracy import AccuracyReport, measure, warn_if_inaccurate
from .checkpoint import capture_rng, checkpoint_folder, latest_checkpoint, load_state, restore_rng, save_checkpoint
from .errors import BackpropSkipError, NoLoraLayersError, NotCompiledError
from .executor import ExecutorStatistics, LayerSpec, LocalExecutor, MatmulExecutor, ReadingExecutor
from .layers import Call, RemoteContext, RemoteGroup, RemoteLinear, find_groups, unwrap_base_layers, wrap_base_layers
from .overlap import StepRunner
from .quantization import CPU_SECONDS, refresh_threads, torch_cpu

FHE_MODES = ("disable", "simulate", "execute", "remote")
IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at position t predict labels at t + 1."""
    shift_logits = logits[..., :-1, :].contiguous()  # batch, tokens - 1, vocab
    shift_labels = labels[..., 1:].contiguous()  # batch, tokens - 1
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=ignore_index)


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


def _check_int(name: str, value: object, low: int = 1) -> None:
    """A ValueError naming ``name`` unless ``value`` is an int >= ``low`` (bools are not counts)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


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
    _check_int("gradient_accumulation_steps", steps)
    if norm is not None and not (isinstance(norm, (int, float)) and norm > 0 and math.isfinite(norm)):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {norm!r}")
    return steps, None if norm is None else float(norm)


def split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask, labels) from a batch.

    Accepted: a tensor of token ids; a mapping with ``input_ids`` and optionally ``attention_mask``
    and ``labels``; a tuple ``(input_ids, labels)`` or ``(input_ids, attention_mask, labels)``.
    Missing labels are the inputs themselves (causal LM), with padded positions ignored.
    """
    mask = labels = None
    if isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch mapping needs 'input_ids', got keys {sorted(batch)}")
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        ids, *rest = batch
        mask, labels = (None, rest[0]) if len(rest) == 1 else rest
    else:
        raise TypeError("a batch must be a tensor of token ids, a mapping with 'input_ids', "
                        f"or a tuple (input_ids, labels) / (input_ids, attention_mask, labels); got {type(batch).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor (batch, tokens), got {shape}; a loader yields batches, not rows")
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(ids.shape)}")
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            bad = torch.unique(mask[~binary])[:5].tolist()
            raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real token), got values {bad}")
    if labels is None:
        labels = ids.clone()
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


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


def _first_batch(inputset: object) -> object:
    """A tensor, mapping or tuple is one batch; any other iterable (a DataLoader) gives its first."""
    if isinstance(inputset, (torch.Tensor, Mapping, tuple)):
        return inputset
    try:
        return next(iter(inputset))  # type: ignore[call-overload]
    except (TypeError, StopIteration):
        raise ValueError("inputset must be a batch (tensor, mapping or tuple) or a non-empty iterable of batches") from None


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
        _check_int("n_layers_to_skip_for_backprop", n_layers_to_skip_for_backprop, low=0)
        _check_int("logging_steps", logging_steps)
        _check_int("eval_steps", eval_steps)
        if save_steps is not None:
            _check_int("save_steps", save_steps)
        _check_int("micro_batches_in_flight", micro_batches_in_flight)
        self.model = model
        self.optimizer = optimizer
        self.loss_fn = loss_fn
        self.lr_scheduler = lr_scheduler
        self.gradient_accumulation_steps, self.max_grad_norm = _training_args(training_args)
        self.n_layers_to_skip_for_backprop = n_layers_to_skip_for_backprop
        self.eval_loader = eval_loader
        self.eval_metric_fn = eval_metric_fn
        self.logging_steps = logging_steps
        self.eval_steps = eval_steps
        self.train_log_path = None if train_log_path is None else Path(train_log_path)
        self.checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
        self.save_steps = save_steps
        self.remote_lm_head = remote_lm_head
        self.executor = executor
        self._steps = StepRunner(micro_batches_in_flight)
        self._trainable = [p for p in model.parameters() if p.requires_grad]
        self._context = RemoteContext()
        self._layers: dict[str, RemoteLinear] = {}
        self._groups: dict[str, RemoteGroup] = {}  # by group key: what the executor is asked for
        self._specs: dict[str, LayerSpec] = {}
        self._local: dict[str, LocalExecutor] = {}
        self._compiled = False
        self._thin = False  # some remote layer's weights stay on disk (load_remote_model)
        self._bound: object | None = None  # the remote executor whose weights were checked against ours
        self._records: list[StepRecord] = []
        self.accuracy: AccuracyReport | None = None  # measured by compile() on its inputset

    # -- compile --------------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        """True once ``compile()`` made keys, until ``save_and_clear_private_info`` drops them."""
        return self._compiled

    def compile(self, inputset: object, n_bits: int | None = None, *, precision: Precision | None = None,
                profile: str = "default", check_accuracy: bool = True, group_layers: bool = True) -> None:
        """Put remote layers in place, check the backprop skip on ``inputset``, choose parameters, make
        keys, and measure the quantized model's accuracy on ``inputset``.

        Bit widths: ``precision`` (activations forward, gradients backward, weights), or Concrete ML's
        ``n_bits`` for activations and gradients alike with the default weight bits; neither: the
        defaults of :class:`~cipherswarm.fhe_backend.quant.Precision`, chosen on a real pretrained
        model (trainer/README.md, Quantization). Activations are quantized per token at run time, so
        ``inputset`` (one batch, or a loader whose first batch is used) traces which layers run, in
        what order, and which inputs need a gradient; then, with ``check_accuracy``, the float and
        the quantized forward of it are compared (:mod:`.accuracy`): ``self.accuracy`` holds the
        figures, and an :class:`~.accuracy.AccuracyWarning` names what exceeds the thresholds.
        ``profile`` is the encryption profile of ``fhe="execute"``: "default", or "shared-mask"
        (half the provider work and returned bytes; key material of about each layer's size).
        ``group_layers``: layers the trace finds reading the same input (q/k/v, gate/up) become one
        call each way (layers.py): one upload forward, one download backward. False keeps every
        layer a call of its own (each token's gradient then quantized per layer, not per group).
        """
        if n_bits is not None and precision is not None:
            raise ValueError("give n_bits or precision, not both")
        if n_bits is not None:
            check_bits("n_bits", n_bits, MIN_X_BITS, MAX_X_BITS)
        precision = precision if precision is not None else Precision.of(n_bits)
        self._local, self._specs, self._compiled, self._bound = {}, {}, False, None  # until this call succeeds, encrypted modes are refused
        self.accuracy = None
        base = self.model.get_base_model()
        unwrap_base_layers(base)
        self._context = RemoteContext(precision=precision)
        self._layers = wrap_base_layers(base, self._context, remote_lm_head=self.remote_lm_head)
        if not self._layers:
            raise ValueError("the model has no frozen nn.Linear or Conv1D base layer to run remotely")
        batch = _first_batch(inputset)
        trace = self._trace(batch)
        self._apply_backprop_skip(trace)
        self._group(find_groups(trace) if group_layers else [])
        # Built once: each spec prepares its integer weights once, shared by every executor made from it.
        self._specs = {k: LayerSpec(k, group.weight, precision, group.backward_enabled, group.layer.digest)
                       for k, group in self._groups.items()}
        specs = self.layer_specs()
        self._thin = any(layer.thin for layer in self._layers.values())
        self._local = {} if self._thin else {  # a thin model's weights are on disk: no in-process provider
            "execute": LocalExecutor(specs, backend="rlwe", profile=profile),
            "simulate": LocalExecutor(specs, backend="clear", verify=False),
        }
        if check_accuracy:
            self.accuracy = self._measure_accuracy(batch)
            warn_if_inaccurate(self.accuracy)
        self._compiled = True
        self._log({"event": "compile", "precision": asdict(precision), "profile": profile, "layers": len(self._layers), "calls": len(specs),
                   "backward_layers": sum(len(g.members) for g in self._groups.values() if g.backward_enabled),
                   "accuracy": None if self.accuracy is None else self.accuracy.as_dict()})

    def _measure_accuracy(self, batch: object) -> AccuracyReport:
        """The float and the quantized forward of ``batch`` compared (:mod:`.accuracy`); the quantized
        products are ``simulate``'s, read from disk a layer at a time for a thin model."""
        if self._thin:
            sources = {g.key: g.members[0].original.source for g in self._groups.values()}
            executor: MatmulExecutor = ReadingExecutor(lambda key: sources[key].read(key))
        else:
            executor = self._local["simulate"]
        ids, mask, labels = split_batch(batch)
        return measure(self.model, self._context, executor, ids, mask, labels, self.loss_fn or causal_lm_loss)

    def _trace(self, batch: object) -> list[Call]:
        """Every remote-layer call of one plain forward, in order."""
        ids, mask, _ = split_batch(batch)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self._context.trace = []
        try:
            self.model.eval()  # no dropout: tracing must not consume random numbers
            with torch.enable_grad():
                self.model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device))
            return self._context.trace
        finally:
            self._context.trace, self._context.last_input = None, None
            self.model.train(was_training)

    def _group(self, groups: list[list[str]]) -> None:
        """One :class:`RemoteGroup` per run of layers reading the same input; layers that did not
        run in the trace stay alone."""
        of = {key: keys for keys in groups for key in keys}
        self._groups = {}
        for key in self._layers:  # module order
            keys = of.get(key, [key])
            if key != keys[0] and keys[0] in self._layers:
                continue
            group = RemoteGroup([self._layers[k] for k in keys])
            for layer in group.members:
                layer.group = group
            self._groups[group.key] = group

    def _apply_backprop_skip(self, trace: list[Call]) -> None:
        """Mark the first ``n_layers_to_skip_for_backprop`` layers (execution order) forward-only.

        Dropping the backward of a layer whose input depends on a LoRA weight would silently lose
        gradient, so that is an error naming the layer and the largest valid value.
        """
        order: list[str] = []
        needs_grad: dict[str, bool] = {}
        for key, requires, _ in trace:
            if key not in needs_grad:
                order.append(key)
            needs_grad[key] = needs_grad.get(key, False) or requires
        n = self.n_layers_to_skip_for_backprop
        max_skip = next((i for i, key in enumerate(order) if needs_grad[key]), len(order))
        if n > max_skip:
            layer = order[max_skip] if max_skip < len(order) else "(none)"
            why = (f"the backward of {layer!r}, whose input depends on trainable weights" if max_skip < len(order)
                   else f"more layers than the {len(order)} that ran")
            raise BackpropSkipError(f"n_layers_to_skip_for_backprop={n} would skip {why}; use at most {max_skip}",
                                    layer=layer, max_skip=max_skip)
        for layer in self._layers.values():
            layer.backward_enabled = True
        for key in order[:n]:
            self._layers[key].backward_enabled = False

    def layer_specs(self) -> dict[str, LayerSpec]:
        """Public description of every remote layer (weights, bits, directions), for building an executor."""
        if not self._specs:
            raise NotCompiledError("call compile(inputset) first")
        return dict(self._specs)

    # -- modes ----------------------------------------------------------------------------------

    def _executor_for(self, fhe: str, executor: MatmulExecutor | None) -> MatmulExecutor | None:
        if fhe not in FHE_MODES:
            raise ValueError(f"fhe must be one of {FHE_MODES}, got {fhe!r}")
        if fhe == "disable":
            return None
        if not self.compiled:
            raise NotCompiledError(f"call compile(inputset) before using fhe={fhe!r}")
        if fhe != "remote":
            if self._thin:
                raise ValueError(f"fhe={fhe!r} runs the products in this process, which needs the base weights in memory; "
                                 "this model was loaded without them (load_remote_model): use fhe='remote' or 'disable'")
            return self._local[fhe]
        executor = executor if executor is not None else self.executor
        if executor is None:
            raise ValueError("fhe='remote' needs an executor: pass executor=... with a method "
                             "matmul(layer_key, x_int, *, transpose), e.g. a node client built from trainer.layer_specs()")
        if not callable(getattr(executor, "matmul", None)):
            raise TypeError(f"executor {type(executor).__name__} has no matmul(layer_key, x_int, *, transpose) method")
        check = getattr(executor, "check_layers", None)
        if check is not None and self._bound is not executor:
            check({k: s.digest for k, s in self._specs.items()})  # one model on both sides, before any product
            self._bound = executor
        return executor

    @contextlib.contextmanager
    def fhe_mode(self, fhe: str = "execute", executor: MatmulExecutor | None = None) -> Iterator[MatmulExecutor | None]:
        """Within the block, every forward and backward of the model runs in mode ``fhe``.

        For inference or evaluation under encryption; ``train`` uses it too. Yields the executor.
        """
        chosen = self._executor_for(fhe, executor)
        previous = self._context.executor
        self._context.executor = chosen
        try:
            yield chosen
        finally:
            self._context.executor = previous

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
    ) -> None:
        """Train for ``num_epochs`` epochs (in total, counting those a resumed checkpoint already did).

        ``fhe``: "disable" (plain float), "simulate" (the exact integer computation in the clear),
        "execute" (encrypted, products by an in-process provider, checked), "remote" (``executor``,
        or the constructor's, computes the products). ``resume_from_checkpoint``: a checkpoint
        folder, or True for the latest one in ``checkpoint_dir``. ``max_steps`` stops (and
        checkpoints) after that many optimizer steps in total.
        """
        _check_int("num_epochs", num_epochs)
        if max_steps is not None:
            _check_int("max_steps", max_steps)
        with self.fhe_mode(fhe, executor) as active:
            self.model.to(device)
            self.model.train()
            run = _Run(loader=train_loader, executor=active, device=device, max_steps=max_steps, progress=progress)
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
        if self.loss_fn is None:
            out = self.model(input_ids=ids, attention_mask=mask, labels=labels)
            loss = getattr(out, "loss", None)
            if loss is None:
                raise ValueError("the model returned no loss; pass loss_fn=causal_lm_loss (or your own)")
        else:
            out = self.model(input_ids=ids, attention_mask=mask)
            loss = self.loss_fn(out if isinstance(out, torch.Tensor) else out.logits, labels)
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

        previous = self._context.executor
        with self._steps.executor(previous) as turn_taking:
            self._context.executor = turn_taking
            try:
                results = self._steps.run(batches, partial(self._micro_step, device=run.device), taken)
            finally:
                self._context.executor = previous
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
        h = hashlib.sha256()
        for key in sorted(self._specs):
            h.update(key.encode() + b"\x00" + self._specs[key].digest)
        return h.hexdigest()

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
        for ex in (*self._local.values(), self.executor):
            clear = getattr(ex, "clear_private_info", None)
            if clear is not None:
                clear()
        self._local, self._specs, self._layers, self._compiled, self._bound = {}, {}, {}, False, None
        unwrap_base_layers(self.model.get_base_model())
        self._log({"event": "saved_and_cleared", "path": str(path)})

    def _log(self, entry: dict[str, Any]) -> None:
        """Append one JSON line to the training log (readable with ``json.loads`` per line)."""
        if self.train_log_path is None:
            return
        self.train_log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.train_log_path.open("a") as f:
            f.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")
