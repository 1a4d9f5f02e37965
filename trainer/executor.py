"""The seam between the trainer and whoever computes the base layers' integer products.

The trainer only ever asks one question of an executor::

    executor.matmul(layer_key, x_int, transpose=False)  ->  exact int64 x_int @ Wq
    executor.matmul(layer_key, g_int, transpose=True)   ->  exact int64 g_int @ Wq.T

where ``Wq`` is the layer's public integer weight (``LayerSpec.weight.q``, d_in x d_out, named by
``LayerSpec.digest``) and the inputs
are signed integers of ``LayerSpec.precision.x_bits(transpose)`` bits (tokens x features, a CPU integer tensor: the quantizer's int8 or int16). How the product is obtained -
encrypted to a provider in this process, in the clear, or over the network - is the executor's
business. :class:`LocalExecutor` is the in-process implementation used by ``fhe="simulate"`` (clear
backend) and ``fhe="execute"`` (RLWE backend, Freivalds-checked); ``fhe="remote"`` takes any object
with the same ``matmul`` method, e.g. the node client built from :meth:`LoraTrainer.layer_specs`.
An executor that knows its weights by digest also has ``check_layers({layer_key: digest})``: the
trainer calls it before the first product, so a model that differs from the one the executor
serves (other weights, another dtype) is refused before training, not found out by its losses.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields
from functools import cached_property
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

import torch

from cipherswarm.fhe_backend import Ciphertext, MatmulResult, PlainWeights, get_backend
from cipherswarm.fhe_backend.errors import VerificationFailed
from cipherswarm.fhe_backend.clear import exact_matmul
from cipherswarm.fhe_backend.quant import Precision, QuantizedWeight
from cipherswarm.fhe_backend.verify import FreivaldsVerifier

from .errors import NotCompiledError


@runtime_checkable
class MatmulExecutor(Protocol):
    """Anything that returns exact integer products for named layers (see the module docstring)."""

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        """Exact int64 ``x_int @ Wq`` (``transpose=False``) or ``x_int @ Wq.T`` (``transpose=True``)."""


@dataclass(frozen=True, eq=False)
class LayerSpec:
    """Everything public about one remote layer: what a provider holds and a client checks against."""

    key: str  # HF module name of the base layer, e.g. "model.layers.0.self_attn.q_proj"; its tensor is "<key>.weight"
    weight: QuantizedWeight | None  # the shared integer quantization (d_in x d_out); None: it stays on disk
    precision: Precision  # bits of activations (forward), gradients (backward) and weights
    backward: bool  # whether g @ Wq.T is ever requested (False for the first n_layers_to_skip_for_backprop)
    digest: bytes = b""  # SHA-256 of the quantization: names the weights providers must use

    @cached_property
    def plain(self) -> PlainWeights:
        """The integer weights prepared once for parameter choice, products and checks."""
        if self.weight is None:
            raise ValueError(f"{self.key}: the model was loaded without its base weights (load_remote_model); "
                             "only fhe='remote' and fhe='disable' can run it")
        return PlainWeights(self.weight.q)


@dataclass(frozen=True)
class ExecutorStatistics:
    """Cumulative client-side cost of an executor; subtract two snapshots to get one step's share.

    CPU seconds are ``time.process_time`` (all threads of this process). ``provider_s`` is the
    in-process provider's share, which a real client would not pay; bytes are the payload handed
    to providers (the wire form's words when products run in-process without serialising).
    """

    calls: int = 0
    encrypt_s: float = 0.0
    decrypt_s: float = 0.0
    verify_s: float = 0.0
    wire_s: float = 0.0  # serialising ciphertexts and parsing results
    provider_s: float = 0.0
    bytes_sent: int = 0
    bytes_received: int = 0

    @property
    def crypto_s(self) -> float:
        """The client's CPU seconds spent on encryption, decryption, checks and wire formats."""
        return self.encrypt_s + self.decrypt_s + self.verify_s + self.wire_s

    def __sub__(self, other: "ExecutorStatistics") -> "ExecutorStatistics":
        return ExecutorStatistics(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    @classmethod
    def of(cls, executor: object) -> "ExecutorStatistics":
        """Snapshot of any executor: its ``statistics()`` if it has one, else zeros."""
        stats = getattr(executor, "statistics", None)
        if stats is None:
            return cls()
        snap = stats()
        return snap if isinstance(snap, cls) else cls(**{f.name: getattr(snap, f.name, f.default) for f in fields(cls)})


class LoopbackProvider:
    """A provider in this process: holds only public integer weights, never a key."""

    def __init__(self, weights: Mapping[str, PlainWeights], *, backend: str = "rlwe") -> None:
        self._weights = dict(weights)
        self._backend = get_backend(backend)

    def matmul(self, layer_key: str, ct: Any, *, transpose: bool) -> Any:
        """The encrypted product of a ciphertext object with the named layer's weights."""
        return self._backend.matmul(ct, self._weights[layer_key], transpose=transpose)

    def matmul_bytes(self, layer_key: str, payload: bytes, *, transpose: bool) -> bytes:
        """The same, from and to the wire form: all a remote provider ever sees."""
        ct = self._backend.Ciphertext.from_bytes(payload)
        return self.matmul(layer_key, ct, transpose=transpose).to_bytes()


@dataclass(frozen=True, eq=False)
class _Channel:
    """One layer and direction on the client: parameters, secret key and product checker."""

    secret: Any  # the secret key (a SecretKey, SharedMaskKey or the clear stand-in)
    verifier: FreivaldsVerifier | None


def _payload_bytes(obj: object) -> int:
    """Words a ciphertext or result puts on the wire, sized by its parameters (headers aside)."""
    if isinstance(obj, Ciphertext):
        return obj.params.payload_bytes(obj.tokens, obj.d)
    if isinstance(obj, MatmulResult):
        return obj.params.result_bytes(obj.tokens, obj.d_out)
    return 0  # the clear backend sends nothing anywhere


class LocalExecutor:
    """Client side of every remote layer, with a :class:`LoopbackProvider` in this process.

    Per layer and direction it chooses parameters from the weights (``params_for``), makes a secret
    key and, when ``verify``, a Freivalds checker. ``matmul`` encrypts, has the provider multiply,
    decrypts and checks. With ``wire=True`` ciphertexts and results cross as bytes
    (``to_bytes``/``from_bytes``), exactly what a network provider would receive and return.
    ``profile="shared-mask"`` (rlwe only) halves the provider's work and the bytes it returns, at
    the price of key material of about the layer's size per layer and direction in client memory;
    ``profile="compact"`` (rlwe only) sends about 30% fewer bytes each way, its products carrying
    noise below the activations' own rounding error (fhe_backend/params.py);
    ``profile="compact-shared-mask"`` is both.
    """

    def __init__(
        self,
        layers: Mapping[str, LayerSpec],
        *,
        backend: str = "rlwe",
        profile: str = "default",
        wire: bool = False,
        verify: bool = True,
        provider: LoopbackProvider | None = None,
    ) -> None:
        self._backend = get_backend(backend)
        self._provider = provider or LoopbackProvider({k: s.plain for k, s in layers.items()}, backend=backend)
        self._wire = wire
        self._channels: dict[tuple[str, bool], _Channel] = {}
        chosen = {} if profile == "default" else {"profile": profile}  # the clear backend knows only the default
        for key, spec in layers.items():
            for transpose in (False, True) if spec.backward else (False,):
                params = self._backend.params_for(spec.plain, spec.precision.x_bits(transpose), transpose=transpose, **chosen)
                if profile in ("shared-mask", "compact-shared-mask"):  # its key is bound to the layer's weights
                    secret = self._backend.keygen(params, weights=spec.plain, transpose=transpose)
                else:
                    secret = self._backend.keygen(params)
                checker = FreivaldsVerifier.for_params(spec.plain, params, transpose=transpose) if verify else None
                self._channels[key, transpose] = _Channel(secret, checker)
        self._stats = ExecutorStatistics()
        self.params = {k: ch.secret.params for k, ch in self._channels.items()}  # (layer, transpose) -> Params

    def statistics(self) -> ExecutorStatistics:
        """Cumulative CPU seconds and bytes so far."""
        return self._stats

    def clear_private_info(self) -> None:
        """Forget every secret key and checker; later products raise :class:`NotCompiledError`."""
        self._channels.clear()

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        ch = self._channels.get((layer_key, transpose))
        if ch is None:
            what = "keys were cleared" if not self._channels else "no keys were made for it"
            raise NotCompiledError(f"layer {layer_key!r} (transpose={transpose}): {what}; call compile() again")
        be, clock = self._backend, time.process_time
        t0 = clock()
        ct = be.encrypt(ch.secret, x_int)
        t1 = clock()
        if self._wire:
            payload = ct.to_bytes()
            t2 = clock()
            reply = self._provider.matmul_bytes(layer_key, payload, transpose=transpose)
            t3 = clock()
            out = be.Result.from_bytes(reply)
            sent, received = len(payload), len(reply)
        else:
            t2 = t1
            out = self._provider.matmul(layer_key, ct, transpose=transpose)
            t3 = clock()
            sent, received = _payload_bytes(ct), _payload_bytes(out)
        t4 = clock()
        y = be.decrypt(ch.secret, out)
        t5 = clock()
        if ch.verifier is not None:
            try:
                ch.verifier.check(x_int, y)
            except VerificationFailed as exc:
                raise VerificationFailed(f"layer {layer_key!r} (transpose={transpose}): {exc}", bad_rows=exc.bad_rows) from exc
        t6 = clock()
        s = self._stats
        self._stats = ExecutorStatistics(
            calls=s.calls + 1, encrypt_s=s.encrypt_s + (t1 - t0), decrypt_s=s.decrypt_s + (t5 - t4),
            verify_s=s.verify_s + (t6 - t5), wire_s=s.wire_s + (t2 - t1) + (t4 - t3), provider_s=s.provider_s + (t3 - t2),
            bytes_sent=s.bytes_sent + sent, bytes_received=s.bytes_received + received,
        )
        return y


class ReadingExecutor:
    """The exact integer products in the clear, from weights read one layer at a time by ``read``
    (a layer key -> its quantization): what ``simulate`` computes, for a model whose weights stay
    on disk. ``compile()`` measures a thin model's accuracy with it, once, on the inputset."""

    def __init__(self, read: Callable[[str], QuantizedWeight]) -> None:
        self._read = read

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        q = self._read(layer_key).q
        return exact_matmul(x_int, q.t() if transpose else q)
