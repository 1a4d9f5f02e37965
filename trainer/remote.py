"""Any peft model whose frozen base layers run on an executor, for any training loop.

:class:`RemoteBaseLayers` is everything that turns a model's frozen base ``nn.Linear``/``Conv1D``
layers into remote ones, and the one place where that is done (:class:`~.trainer.LoraTrainer` uses
it too): ``compile(inputset)`` puts a :class:`~.layers.RemoteLinear` in place of each, traces one
forward of ``inputset`` to find the execution order, the layers that need no backward pass
(``n_layers_to_skip_for_backprop``) and the layers reading the same input (groups), builds the
public :class:`~.executor.LayerSpec` of every call, makes the in-process executors of ``simulate``
and ``execute`` (keys included) and measures the quantized model's accuracy. ``mode(fhe)`` then
chooses who computes the products, and from then on ``model(...)`` and ``loss.backward()``,
wherever they are called - Hugging Face ``Trainer``, TRL's ``SFTTrainer``, a plain torch loop -
run the base layers there::

    from cipherswarm.trainer import remote_base_layers
    remote = remote_base_layers(peft_model, inputset, fhe="execute")   # compile, then switch
    loss = peft_model(**batch).loss                                    # base layers encrypted
    loss.backward()                                                    # their g @ W.T too
    with remote.mode("simulate"):                                      # another mode for a block
        ...
    remote.mode("remote", executor=swarm_client)                       # or switch for good
    remote.clear_private_info()                                        # keys gone, float layers back

``remote_base_layers`` is that in one call. Modes, bit widths and the executor seam are those of
``LoraTrainer`` (trainer/README.md).

``plan(inputset)`` is the part of ``compile`` that needs no weight values: it puts the remote layers
in place, traces and groups them, and returns the executor calls a training micro-batch makes, in
order. It runs on a model built on the meta device, which is how the simulator gets its workload
(:mod:`.workload`): from this code, not from a second statement of its rules.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import asdict
from types import TracebackType
from typing import Any, NamedTuple

import torch
from peft import PeftModel

from cipherswarm.fhe_backend.quant import MAX_X_BITS, MIN_X_BITS, Precision, check_bits

from .accuracy import AccuracyReport, measure, warn_if_inaccurate
from .errors import BackpropSkipError, NotCompiledError
from .executor import ExecutorStatistics, LayerSpec, LocalExecutor, MatmulExecutor, ReadingExecutor
from .batches import batch_loss, causal_lm_loss, first_batch, split_batch
from .layers import Call, RemoteContext, RemoteGroup, RemoteLinear, find_groups, unwrap_base_layers, wrap_base_layers

FHE_MODES = ("disable", "simulate", "execute", "remote")


class PlannedCall(NamedTuple):
    """One executor call of a training micro-batch: a group's ``x @ W``, or ``g @ W.T`` (``transpose``)."""

    key: str  # the group's key (``RemoteBaseLayers.groups``): what the executor is asked for
    transpose: bool


def check_int(name: str, value: object, low: int = 1) -> None:
    """A ValueError naming ``name`` unless ``value`` is an int >= ``low`` (bools are not counts)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")


def check_mode(fhe: object) -> None:
    """A ValueError unless ``fhe`` is one of :data:`FHE_MODES`."""
    if fhe not in FHE_MODES:
        raise ValueError(f"fhe must be one of {FHE_MODES}, got {fhe!r}")


class ModeSwitch:
    """What :meth:`RemoteBaseLayers.mode` returns: the switch is made already; used as a context
    manager, the previous mode comes back at the end of the block. ``executor``: the one chosen
    (None for ``disable``)."""

    def __init__(self, owner: "RemoteBaseLayers", context: RemoteContext, previous: tuple[str, MatmulExecutor | None],
                 fhe: str, executor: MatmulExecutor | None) -> None:
        self._owner, self._context, self._previous = owner, context, previous
        self.fhe, self.executor = fhe, executor

    def __enter__(self) -> MatmulExecutor | None:
        return self.executor

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        if self._owner.context is self._context:  # else compile() ran in the block: its mode stays
            self._owner._fhe, self._context.executor = self._previous

    def __repr__(self) -> str:
        return f"ModeSwitch(fhe={self.fhe!r})"


class RemoteBaseLayers:
    """The frozen base layers of ``model`` (a peft model, or any HF model whose trainable weights
    are set), computed by an executor in the mode of :meth:`mode` (module docstring).

    ``n_layers_to_skip_for_backprop``: the first layers in execution order get no backward keys
    (:class:`~.errors.BackpropSkipError` if one of them needs an input gradient);
    ``remote_lm_head``: run the output head remotely too; ``executor``: the default of
    ``fhe="remote"``. Nothing changes in ``model`` until :meth:`compile`.
    """

    def __init__(self, model: torch.nn.Module, *, n_layers_to_skip_for_backprop: int = 1, remote_lm_head: bool = False,
                 executor: MatmulExecutor | None = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (a peft model), got {type(model).__name__}")
        check_int("n_layers_to_skip_for_backprop", n_layers_to_skip_for_backprop, low=0)
        self.model = model
        self.n_layers_to_skip_for_backprop = n_layers_to_skip_for_backprop
        self.remote_lm_head = remote_lm_head
        self.executor = executor  # the default for fhe="remote"
        self.context = RemoteContext()  # shared by every remote layer; its executor is the mode
        self.layers: dict[str, RemoteLinear] = {}  # by layer key, in module order
        self.groups: dict[str, RemoteGroup] = {}  # by group key: what the executor is asked for
        self.local_executors: dict[str, LocalExecutor] = {}  # "simulate", "execute": in this process, with the keys
        self.calls: list[PlannedCall] = []  # what one training micro-batch asks the executor, in order (plan)
        self.accuracy: AccuracyReport | None = None  # measured by compile() on its inputset
        self.precision: Precision | None = None
        self.profile = "default"
        self.thin = False  # some remote layer's weights stay on disk (load_remote_model)
        self._specs: dict[str, LayerSpec] = {}
        self._compiled = False
        self._bound: object | None = None  # the remote executor whose weights were checked against ours
        self._fhe = "disable"

    def __repr__(self) -> str:
        state = f"{len(self.layers)} layers in {len(self._specs)} calls, fhe={self.fhe!r}" if self.compiled else "not compiled"
        return f"RemoteBaseLayers({type(self.model).__name__}, {state})"

    @property
    def base_model(self) -> torch.nn.Module:
        """The Hugging Face model whose layers are replaced: under peft, its base model."""
        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    # -- compile --------------------------------------------------------------------------------

    @property
    def compiled(self) -> bool:
        """True once ``compile()`` made keys, until ``clear_private_info`` drops them."""
        return self._compiled

    def compile(self, inputset: object, n_bits: int | None = None, *, precision: Precision | None = None,
                profile: str = "default", check_accuracy: bool = True, group_layers: bool = True,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> AccuracyReport | None:
        """Put remote layers in place, check the backprop skip on ``inputset``, choose parameters, make
        keys, and measure the quantized model's accuracy on ``inputset``; returns ``self.accuracy``.

        Bit widths: ``precision`` (activations forward, gradients backward, weights), or Concrete ML's
        ``n_bits`` for activations and gradients alike with the default weight bits; neither: the
        defaults of :class:`~cipherswarm.fhe_backend.quant.Precision`, chosen on a real pretrained
        model (trainer/README.md, Quantization). Activations are quantized per token at run time, so
        ``inputset`` (one batch, or a loader whose first batch is used) traces which layers run, in
        what order, and which inputs need a gradient; then, with ``check_accuracy``, the float and
        the quantized forward of it are compared (:mod:`.accuracy`, the loss by ``loss_fn``, by
        default :func:`causal_lm_loss`): ``self.accuracy`` holds the figures, and an
        :class:`~.accuracy.AccuracyWarning` names what exceeds the thresholds.
        ``profile`` is the encryption profile of ``fhe="execute"``: "default", or "shared-mask"
        (half the provider work and returned bytes; key material of about each layer's size).
        ``group_layers``: layers the trace finds reading the same input (q/k/v, gate/up) become one
        call each way (layers.py): one upload forward, one download backward. False keeps every
        layer a call of its own (each token's gradient then quantized per layer, not per group).
        A layer whose output the loss does not read on ``inputset`` (``loss_fn``; without one, no
        output of the model) - BERT's pooler under a mean-pooled loss, a layer that does not run -
        stays a float module of the client: it gets no key and is never sent out. The mode
        afterwards is ``disable``.
        """
        if n_bits is not None and precision is not None:
            raise ValueError("give n_bits or precision, not both")
        if n_bits is not None:
            check_bits("n_bits", n_bits, MIN_X_BITS, MAX_X_BITS)
        precision = precision if precision is not None else Precision.of(n_bits)
        self.profile = profile
        batch = first_batch(inputset)
        self._place(batch, precision, loss_fn, group_layers)
        # Built once: each spec prepares its integer weights once, shared by every executor made from it.
        self._specs = {k: LayerSpec(k, group.weight, precision, group.backward_enabled, group.layer.digest)
                       for k, group in self.groups.items()}
        specs = self.layer_specs()
        self.thin = any(layer.thin for layer in self.layers.values())
        self.local_executors = {} if self.thin else {  # a thin model's weights are on disk: no in-process provider
            "execute": LocalExecutor(specs, backend="rlwe", profile=profile),
            "simulate": LocalExecutor(specs, backend="clear", verify=False),
        }
        if check_accuracy:
            self.accuracy = self._measure_accuracy(batch, loss_fn or causal_lm_loss)
            warn_if_inaccurate(self.accuracy)
        self._compiled = True
        return self.accuracy

    def plan(self, inputset: object, *, precision: Precision | None = None, group_layers: bool = True,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> list[PlannedCall]:
        """The executor calls one training micro-batch like ``inputset`` makes, in order, found as
        ``compile()`` finds them (same arguments) but without quantizing a weight or making a key:
        remote layers are put in place, the forward is traced, unread layers are left out, the
        backprop skip is checked (:class:`~.errors.BackpropSkipError`) and groups are formed.

        The trace needs shapes only, so the model may be built on the meta device
        (``with torch.device("meta"):``): a model too large for this machine is planned all the
        same. This is where the simulator's workload comes from (:mod:`.workload`): the calls it
        replays are the ones this code makes. Afterwards ``self.groups`` and ``self.calls`` hold the
        plan; the model is not compiled (mode ``disable``, its float modules computing)."""
        self._place(first_batch(inputset), precision if precision is not None else Precision(), loss_fn, group_layers)
        return list(self.calls)

    def _place(self, batch: object, precision: Precision,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None, group_layers: bool) -> None:
        """Everything of ``compile()`` that needs only the model's shapes: remote layers in place,
        ``batch`` traced, unread layers back to float modules, the backprop skip applied, groups
        formed and ``self.calls`` predicted; what was compiled before is dropped first (encrypted
        modes are refused until ``compile()`` succeeds)."""
        self.local_executors, self._specs, self._compiled, self._bound, self._fhe = {}, {}, False, None, "disable"
        self.accuracy, self.precision, self.calls = None, precision, []
        base = self.base_model
        unwrap_base_layers(base)
        self.context = RemoteContext(precision=precision)
        self.layers = wrap_base_layers(base, self.context, remote_lm_head=self.remote_lm_head)
        if not self.layers:
            raise ValueError("the model has no frozen nn.Linear or Conv1D base layer to run remotely")
        trace = self._trace(batch)
        unread = self._unread(batch, loss_fn)
        if unread:  # they stay float modules, computed here if they run at all: nothing of theirs is sent out
            unwrap_base_layers(base, unread)
            self.layers = {k: layer for k, layer in self.layers.items() if k not in unread}
            if not self.layers:
                raise ValueError("the loss reads no frozen nn.Linear or Conv1D base layer: there is nothing to run remotely")
        self._apply_backprop_skip([call for call in trace if call.key not in unread])
        # grouped on the whole trace (whether a call reads its predecessor's input), then the unread left out
        groups = [[k for k in keys if k not in unread] for keys in find_groups(trace)] if group_layers else []
        self._group([keys for keys in groups if keys])
        self.calls = self._predict_calls(trace)

    def _predict_calls(self, trace: list[Call]) -> list[PlannedCall]:
        """The executor calls of one training micro-batch, from the traced forward: a group's product
        when its first member runs (the others take their columns of it, ``RemoteGroup.output``),
        then ``g @ W.T`` of each of those whose input needed a gradient, in reverse (the order in
        which autograd asks a model whose layers run one after another). Unread layers make none."""
        forward = [(layer.group.key, call.needs_grad) for call in trace
                   if (layer := self.layers.get(call.key)) is not None and layer.group.members[0] is layer]
        return [PlannedCall(key, False) for key, _ in forward] + [PlannedCall(key, True) for key, needs in reversed(forward) if needs]

    def summary(self) -> dict[str, Any]:
        """What ``compile()`` set up, JSON-ready (the trainer's training log has it)."""
        return {"precision": None if self.precision is None else asdict(self.precision), "profile": self.profile,
                "layers": len(self.layers), "calls": len(self._specs),
                "backward_layers": sum(len(g.members) for g in self.groups.values() if g.backward_enabled),
                "accuracy": None if self.accuracy is None else self.accuracy.as_dict()}

    def _measure_accuracy(self, batch: object, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> AccuracyReport:
        """The float and the quantized forward of ``batch`` compared (:mod:`.accuracy`); the quantized
        products are ``simulate``'s, read from disk a layer at a time for a thin model."""
        if self.thin:
            sources = {g.key: g.members[0].original.source for g in self.groups.values()}
            executor: MatmulExecutor = ReadingExecutor(lambda key: sources[key].read(key))
        else:
            executor = self.local_executors["simulate"]
        ids, mask, labels = split_batch(batch)
        return measure(self.model, self.context, executor, ids, mask, labels, loss_fn)

    def _trace(self, batch: object) -> list[Call]:
        """Every remote-layer call of one plain forward, in order."""
        ids, mask, _ = split_batch(batch)
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.context.trace = []
        try:
            self.model.eval()  # no dropout: tracing must not consume random numbers
            with torch.enable_grad():
                self.model(input_ids=ids.to(device), attention_mask=None if mask is None else mask.to(device))
            return self.context.trace
        finally:
            self.context.trace, self.context.last_input = None, None
            self.model.train(was_training)

    def _unread(self, batch: object, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> set[str]:
        """The remote layers whose output the loss (``loss_fn``; without one, any output of the
        model) does not read in a float forward of ``batch``: BERT's pooler under a mean-pooled
        loss, or a layer that does not run at all (peft's frozen copy of a ``modules_to_save``
        layer). Found by adding a zero that requires a gradient to each layer's output
        (``RemoteContext.probes``) and asking which of them the loss's gradient reaches: unread
        layers need no key and no call, so their inputs never leave the client."""
        ids, mask, labels = split_batch(batch)
        device = next(self.model.parameters()).device
        ids, labels, mask = ids.to(device), labels.to(device), None if mask is None else mask.to(device)
        was_training = self.model.training
        probes: dict[str, torch.Tensor] = {}
        self.context.probes = probes
        try:
            self.model.eval()  # no dropout: it must not consume random numbers
            with torch.enable_grad():
                if loss_fn is None:
                    target = sum((t.float().sum() for t in _tensors(self.model(input_ids=ids, attention_mask=mask))
                                  if t.requires_grad), torch.zeros(()))
                else:
                    target = batch_loss(self.model, ids, mask, labels, loss_fn)
                keys = list(probes)
                grads = (torch.autograd.grad(target, [probes[k] for k in keys], allow_unused=True)
                         if target.requires_grad else [None] * len(keys))
        finally:
            self.context.probes = None
            self.model.train(was_training)
        return {key for key in self.layers if key not in probes} | {key for key, grad in zip(keys, grads) if grad is None}

    def _group(self, groups: list[list[str]]) -> None:
        """One :class:`RemoteGroup` per run of layers reading the same input; layers that did not
        run in the trace stay alone."""
        of = {key: keys for keys in groups for key in keys}
        self.groups = {}
        for key in self.layers:  # module order
            keys = of.get(key, [key])
            if key != keys[0] and keys[0] in self.layers:
                continue
            group = RemoteGroup([self.layers[k] for k in keys])
            for layer in group.members:
                layer.group = group
            self.groups[group.key] = group

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
        for layer in self.layers.values():
            layer.backward_enabled = True
        for key in order[:n]:
            self.layers[key].backward_enabled = False

    def layer_specs(self) -> dict[str, LayerSpec]:
        """Public description of every remote call (weights, bits, directions), for building an executor."""
        if not self._specs:
            raise NotCompiledError("call compile(inputset) first")
        return dict(self._specs)

    def digest(self) -> str:
        """SHA-256 over every remote call's key and quantization digest: names the base weights
        (a checkpoint is bound to them); that of no layer before ``compile()``."""
        h = hashlib.sha256()
        for key in sorted(self._specs):
            h.update(key.encode() + b"\x00" + self._specs[key].digest)
        return h.hexdigest()

    # -- modes ----------------------------------------------------------------------------------

    @property
    def fhe(self) -> str:
        """The mode every forward and backward of the model runs in now."""
        return self._fhe if self._compiled else "disable"

    def executor_for(self, fhe: str, executor: MatmulExecutor | None = None) -> MatmulExecutor | None:
        """The executor that computes the products in mode ``fhe`` (None: ``disable``, the float
        modules). For ``remote``: ``executor``, or the default one; its ``check_layers``, if it has
        one, is called once with every call's digest, before any product."""
        check_mode(fhe)
        if fhe == "disable":
            return None
        if not self.compiled:
            raise NotCompiledError(f"call compile(inputset) before using fhe={fhe!r}")
        if fhe != "remote":
            if self.thin:
                raise ValueError(f"fhe={fhe!r} runs the products in this process, which needs the base weights in memory; "
                                 "this model was loaded without them (load_remote_model): use fhe='remote' or 'disable'")
            return self.local_executors[fhe]
        executor = executor if executor is not None else self.executor
        if executor is None:
            raise ValueError("fhe='remote' needs an executor: pass executor=... with a method "
                             "matmul(layer_key, x_int, *, transpose), e.g. a node client built from layer_specs()")
        if not callable(getattr(executor, "matmul", None)):
            raise TypeError(f"executor {type(executor).__name__} has no matmul(layer_key, x_int, *, transpose) method")
        check = getattr(executor, "check_layers", None)
        if check is not None and self._bound is not executor:
            check({k: s.digest for k, s in self._specs.items()})  # one model on both sides, before any product
            self._bound = executor
        return executor

    def mode(self, fhe: str, executor: MatmulExecutor | None = None) -> ModeSwitch:
        """Run every later forward and backward of the model in mode ``fhe`` ("disable", "simulate",
        "execute", "remote" with ``executor`` or the default one).

        Switches at once; as a context manager (``with remote.mode("simulate"): ...``) the previous
        mode comes back at the end of the block. A backward pass runs with its forward's executor.
        """
        chosen = self.executor_for(fhe, executor)
        switch = ModeSwitch(self, self.context, (self._fhe, self.context.executor), fhe, chosen)
        self._fhe, self.context.executor = fhe, chosen
        return switch

    def statistics(self) -> ExecutorStatistics:
        """Cumulative client-side cost (CPU seconds, calls, bytes) of the current mode's executor;
        zeros for ``disable`` or an executor without ``statistics()``. Subtract two for a span."""
        return ExecutorStatistics.of(self.context.executor)

    # -- private info ---------------------------------------------------------------------------

    def clear_private_info(self) -> None:
        """Forget every secret: the in-process keys and checkers, and the default executor's (if it
        has ``clear_private_info``). The model gets its original layers back (a float model again,
        mode ``disable``); an encrypted mode needs ``compile()`` again."""
        for ex in (*self.local_executors.values(), self.executor):
            clear = getattr(ex, "clear_private_info", None)
            if clear is not None:
                clear()
        self.local_executors, self._specs, self.layers, self.groups, self.calls = {}, {}, {}, {}, []
        self._compiled, self._bound, self._fhe = False, None, "disable"
        self.context.executor = None
        unwrap_base_layers(self.base_model)


def _tensors(out: object) -> list[torch.Tensor]:
    """Every floating tensor in a model's output (a tensor, or a ModelOutput / tuple / dict of them,
    nested); caches and other objects aside."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for item in out for t in _tensors(item)]
    return []


def remote_base_layers(
    model: torch.nn.Module,
    inputset: object,
    *,
    fhe: str = "execute",
    executor: MatmulExecutor | None = None,
    precision: Precision | None = None,
    n_bits: int | None = None,
    n_layers_to_skip_for_backprop: int = 1,
    remote_lm_head: bool = False,
    profile: str = "default",
    check_accuracy: bool = True,
    group_layers: bool = True,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> RemoteBaseLayers:
    """Make ``model``'s frozen base layers run on an executor, in one call: compile on ``inputset``
    (one batch, or a loader whose first batch is used), then switch to mode ``fhe``.

    Afterwards ``model(...)`` and ``loss.backward()``, in any training loop, compute every frozen
    base layer in that mode: "execute" (encrypted, an in-process provider, checked), "simulate"
    (the same integers in the clear), "remote" (``executor``, e.g. a ``SwarmClient``; it becomes
    the default of later ``mode("remote")`` calls) or "disable" (float). Returns the
    :class:`RemoteBaseLayers`, to switch modes (``mode``), read ``accuracy`` and ``layer_specs()``,
    or ``clear_private_info()``. The other arguments are those of ``RemoteBaseLayers`` and its
    ``compile``.
    """
    check_mode(fhe)
    if fhe == "remote" and executor is None:  # before compiling, which takes a while on a big model
        raise ValueError("fhe='remote' needs an executor: pass executor=... with a method "
                         "matmul(layer_key, x_int, *, transpose), e.g. a node client (cipherswarm.node.SwarmClient)")
    remote = RemoteBaseLayers(model, n_layers_to_skip_for_backprop=n_layers_to_skip_for_backprop,
                              remote_lm_head=remote_lm_head, executor=executor)
    remote.compile(inputset, n_bits, precision=precision, profile=profile, check_accuracy=check_accuracy,
                   group_layers=group_layers, loss_fn=loss_fn)
    remote.mode(fhe, executor)
    return remote
