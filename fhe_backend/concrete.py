"""``concrete``: exact ``x @ w`` as a compiled concrete-python TFHE circuit (optional, tiny shapes).

An independent cross-check of the other backends: a different library, scheme and parameter
optimiser computing the same integers. Install with ``pip install 'cipherswarm[concrete]'``;
without it constructing the backend raises :class:`BackendUnavailable`.

Design:

* The weights are a compile-time constant, so one circuit ``row @ W`` (input shape ``(d_in,)``)
  is compiled per (weights, ``x_bits``) and cached; each token row is one encrypted input, so
  the token count never forces a recompile.
* The inputset holds, besides the all-min and all-max rows, for every output column the rows that
  maximise and minimise it, so the compiler's bit widths cover every in-range input exactly.
* The circuit is leveled (multiplications by clear constants and additions, no bootstrapping), so
  its evaluation keys are empty; they still travel with each ciphertext, as the protocol has the
  provider work from the ciphertext alone. Secret keys never leave the client; their secret and
  encryption seeds are 128-bit values from ``os.urandom`` (the Python API otherwise passes the
  fixed seed 0 down, so key randomness would rest on how the native layer treats that value).
* ``global_p_error = 2^-64``: a decryption is wrong with probability below 2^-64, as in ``rlwe``.

Limits (measured with concrete-python 2.11 on 2 cores): compilation takes 0.1-0.4 s and a row
5-50 ms up to 64 x 64 weights, but a ciphertext costs 6-20 KB per value (one LWE of dimension
750-2400 each), so shapes are capped at ``MAX_TOKENS`` tokens and ``MAX_DIM`` features per side
(:class:`ShapeMismatch` beyond). The optimiser finds no 128-bit parameters once results need more
than ~36 bits (e.g. 16-bit inputs times 20-bit weights): that is a :class:`ParameterError`.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .encryptor import _as_int_matrix, check_range
from .errors import BackendUnavailable, InvalidCiphertext, KeyMismatch, ParameterError, ShapeMismatch
from .params import MAX_X_BITS
from .weights import PlainWeights

INSTALL_HINT = "pip install 'cipherswarm[concrete]'"

MAX_TOKENS = 16
MAX_DIM = 64
#: probability that any output of one circuit run decrypts wrongly
GLOBAL_P_ERROR = 2.0**-64
#: compiled circuits kept (each holds its MLIR program and client specs)
CIRCUIT_CACHE = 32
KEY_ID_BYTES = 8
DIGEST_BYTES = 32


@functools.lru_cache(maxsize=1)
def _fhe() -> Any:
    """``concrete.fhe``, imported on first use (it is slow to import and optional)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # concrete's namespace package imports pkg_resources
            from concrete import fhe
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'concrete' needs concrete-python: {INSTALL_HINT}") from exc
    return fhe


def _seed() -> int:
    return int.from_bytes(os.urandom(16), "little")


@dataclass(frozen=True, eq=False)
class ConcreteParams:
    """The circuit's identity: effective weights (d_in x d_out, already transposed) and ``x_bits``."""

    w: np.ndarray = field(repr=False)  # int64, read-only
    x_bits: int

    def __post_init__(self) -> None:
        if not isinstance(self.x_bits, int) or isinstance(self.x_bits, bool) or not 2 <= self.x_bits <= MAX_X_BITS:
            raise ParameterError(f"x_bits must be an int in [2, {MAX_X_BITS}], got {self.x_bits!r}")
        d_in, d_out = self.w.shape
        if not (1 <= d_in <= MAX_DIM and 1 <= d_out <= MAX_DIM):
            raise ShapeMismatch(
                f"the concrete backend compiles tiny circuits only: weights up to {MAX_DIM} x {MAX_DIM}, "
                f"got {d_in} x {d_out}"
            )

    @functools.cached_property
    def digest(self) -> bytes:
        """SHA-256 over x_bits, shape and weights: names the compiled circuit on both sides."""
        h = hashlib.sha256(b"cipherswarm-concrete-v1")
        h.update(struct.pack("<III", self.x_bits, *self.w.shape))
        h.update(self.w.astype("<i8").tobytes())
        return h.digest()

    @property
    def d_in(self) -> int:
        return self.w.shape[0]

    @property
    def d_out(self) -> int:
        return self.w.shape[1]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ConcreteParams) and self.digest == other.digest

    def __hash__(self) -> int:
        return hash(self.digest)

    def __repr__(self) -> str:
        return f"ConcreteParams({self.d_in} x {self.d_out}, x_bits={self.x_bits}, digest={self.digest.hex()[:16]})"


def _weights(w: "torch.Tensor | PlainWeights", transpose: bool) -> np.ndarray:
    pw = PlainWeights.of(w)
    arr = pw.w.numpy()
    out = np.ascontiguousarray(arr.T if transpose else arr, dtype=np.int64)
    out.setflags(write=False)
    return out


def _inputset(w: np.ndarray, x_bits: int) -> list[np.ndarray]:
    """Rows that reach every column's exact minimum and maximum (and both corners) over the input box."""
    lo, hi = -(1 << (x_bits - 1)), (1 << (x_bits - 1)) - 1
    rows = [np.full(w.shape[0], lo, dtype=np.int64), np.full(w.shape[0], hi, dtype=np.int64)]
    for k in range(w.shape[1]):
        pos = w[:, k] > 0
        rows.append(np.where(pos, hi, lo).astype(np.int64))
        rows.append(np.where(pos, lo, hi).astype(np.int64))
    return rows


_CACHE_LOCK = threading.Lock()
_CIRCUITS: "OrderedDict[bytes, Any]" = OrderedDict()


def _circuit(params: ConcreteParams) -> Any:
    """The compiled ``row @ W`` circuit for ``params`` (compiled once, most recent kept)."""
    with _CACHE_LOCK:
        hit = _CIRCUITS.get(params.digest)
        if hit is not None:
            _CIRCUITS.move_to_end(params.digest)
            return hit
    fhe = _fhe()
    w = params.w

    def row_times_w(x: Any) -> Any:
        return x @ w

    config = fhe.Configuration(show_progress=False, p_error=None, global_p_error=GLOBAL_P_ERROR)
    try:
        circuit = fhe.Compiler(row_times_w, {"x": "encrypted"}).compile(_inputset(w, params.x_bits), config)
    except RuntimeError as exc:
        raise ParameterError(
            f"concrete found no secure parameters for {params.x_bits}-bit inputs times these weights "
            f"(results too wide; use smaller bit widths): {exc}"
        ) from exc
    with _CACHE_LOCK:
        _CIRCUITS[params.digest] = circuit
        while len(_CIRCUITS) > CIRCUIT_CACHE:
            _CIRCUITS.popitem(last=False)
    return circuit


def _circuit_id(params: ConcreteParams) -> bytes:
    """Names what a ciphertext fits: the weights and x_bits, and the crypto parameters the compiler
    chose for them (client specs), so a provider whose compiler differs is caught, not garbage."""
    specs = bytes(_circuit(params).server.client_specs.serialize())
    return hashlib.sha256(params.digest + hashlib.sha256(specs).digest()).digest()


@dataclass(frozen=True, eq=False, repr=False)
class ConcreteSecretKey:
    """A concrete client (secret LWE keys) for one compiled circuit; never serialised."""

    params: ConcreteParams
    key_id: bytes  # public random label
    _client: Any = field(repr=False)
    _eval_keys: bytes = field(repr=False)  # public: empty for this leveled circuit

    def __repr__(self) -> str:
        return f"ConcreteSecretKey(id={self.key_id.hex()}, {self.params!r})"

    def __reduce__(self) -> Any:
        raise TypeError("a ConcreteSecretKey is never serialised")


# -- wire forms: magic | key id | circuit digest | x_bits | rows | cols | eval keys | values ----------

_HEAD = struct.Struct("<4s8s32sIIII")
_LEN = struct.Struct("<I")
CT_MAGIC, OUT_MAGIC = b"CCX1", b"CCY1"


def _pack(magic: bytes, key_id: bytes, digest: bytes, x_bits: int, cols: int, eval_keys: bytes, values: list[Any]) -> bytes:
    blobs = [bytes(v.serialize()) for v in values]
    parts = [_HEAD.pack(magic, key_id, digest, x_bits, len(blobs), cols, len(eval_keys)), eval_keys]
    for b in blobs:
        parts += [_LEN.pack(len(b)), b]
    return b"".join(parts)


def _unpack(data: bytes | bytearray | memoryview, magic: bytes, what: str) -> tuple[bytes, bytes, int, int, bytes, list[Any]]:
    data = memoryview(data)
    if len(data) < _HEAD.size:
        raise InvalidCiphertext(f"concrete {what} truncated: {len(data)} bytes")
    got, key_id, digest, x_bits, rows, cols, ek_len = _HEAD.unpack_from(data)
    if got != magic:
        raise InvalidCiphertext(f"not a concrete {what} (bad magic)")
    if not 2 <= x_bits <= MAX_X_BITS or not 1 <= rows <= MAX_TOKENS or not 1 <= cols <= MAX_DIM:
        raise InvalidCiphertext(f"concrete {what} header out of range: x_bits={x_bits}, {rows} x {cols}")
    off = _HEAD.size
    if off + ek_len > len(data):
        raise InvalidCiphertext(f"concrete {what} truncated in its evaluation keys")
    eval_keys = bytes(data[off : off + ek_len])
    off += ek_len
    fhe = _fhe()
    values = []
    for _ in range(rows):
        if off + _LEN.size > len(data):
            raise InvalidCiphertext(f"concrete {what} truncated")
        (size,) = _LEN.unpack_from(data, off)
        off += _LEN.size
        if off + size > len(data):
            raise InvalidCiphertext(f"concrete {what} truncated")
        try:
            values.append(fhe.Value.deserialize(bytes(data[off : off + size])))
        except Exception as exc:  # the library raises RuntimeError/ValueError on malformed bytes
            raise InvalidCiphertext(f"malformed concrete {what} value: {exc}") from exc
        off += size
    if off != len(data):
        raise InvalidCiphertext(f"concrete {what} has {len(data) - off} trailing bytes")
    return key_id, digest, x_bits, cols, eval_keys, values


@dataclass(frozen=True, eq=False)
class ConcreteCiphertext:
    """Encrypted activations: one concrete value per token row, plus the (public) evaluation keys."""

    key_id: bytes
    circuit: bytes  # _circuit_id of the circuit the rows were encrypted for
    x_bits: int
    d: int
    eval_keys: bytes = field(repr=False)
    values: tuple[Any, ...] = field(repr=False)

    @property
    def tokens(self) -> int:
        return len(self.values)

    def to_bytes(self) -> bytes:
        return _pack(CT_MAGIC, self.key_id, self.circuit, self.x_bits, self.d, self.eval_keys, list(self.values))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "ConcreteCiphertext":
        key_id, digest, x_bits, d, ek, values = _unpack(data, CT_MAGIC, "ciphertext")
        return cls(key_id, digest, x_bits, d, ek, tuple(values))


@dataclass(frozen=True, eq=False)
class ConcreteResult:
    """Encrypted product: one concrete value (d_out outputs) per token row."""

    key_id: bytes
    circuit: bytes
    x_bits: int
    d_out: int
    values: tuple[Any, ...] = field(repr=False)

    @property
    def tokens(self) -> int:
        return len(self.values)

    def to_bytes(self) -> bytes:
        return _pack(OUT_MAGIC, self.key_id, self.circuit, self.x_bits, self.d_out, b"", list(self.values))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "ConcreteResult":
        key_id, digest, x_bits, d_out, ek, values = _unpack(data, OUT_MAGIC, "result")
        if ek:
            raise InvalidCiphertext("a concrete result carries no evaluation keys")
        return cls(key_id, digest, x_bits, d_out, tuple(values))


class ConcreteBackend:
    """Exact encrypted ``x @ w`` through a compiled concrete-python circuit (tiny shapes only)."""

    name = "concrete"
    exact = True
    Ciphertext = ConcreteCiphertext
    Result = ConcreteResult

    def __init__(self) -> None:
        self._fhe = _fhe()  # raises BackendUnavailable when the extra is not installed

    def params_for(self, w: "torch.Tensor | PlainWeights", x_bits: int = 8, *, transpose: bool = False) -> ConcreteParams:
        """The circuit for ``w`` (or ``w.T``) and ``x_bits``-bit inputs, compiled now (and cached)."""
        params = ConcreteParams(_weights(w, transpose), x_bits)
        _circuit(params)
        return params

    def keygen(self, params: ConcreteParams) -> ConcreteSecretKey:
        """Fresh secret keys for the circuit, seeded from os.urandom (128-bit secret and encryption seeds)."""
        if not isinstance(params, ConcreteParams):
            raise ParameterError(f"expected ConcreteParams, got {type(params).__name__}")
        client = self._fhe.Client(_circuit(params).server.client_specs)
        client.keygen(force=True, secret_seed=_seed(), encryption_seed=_seed())
        return ConcreteSecretKey(params, os.urandom(KEY_ID_BYTES), client, bytes(client.evaluation_keys.serialize()))

    def encrypt(self, sk: ConcreteSecretKey, x: torch.Tensor) -> ConcreteCiphertext:
        """Encrypt signed ``x_bits``-bit activations (tokens x d_in), one circuit input per row."""
        xm = _as_int_matrix(x, "activations")
        check_range(xm, sk.params.x_bits)
        if xm.shape[1] != sk.params.d_in:
            raise ShapeMismatch(f"activations have {xm.shape[1]} features, the circuit takes {sk.params.d_in}")
        if xm.shape[0] > MAX_TOKENS:
            raise ShapeMismatch(f"the concrete backend encrypts at most {MAX_TOKENS} tokens, got {xm.shape[0]}")
        rows = tuple(sk._client.encrypt(np.asarray(row, dtype=np.int64)) for row in xm)
        return ConcreteCiphertext(sk.key_id, _circuit_id(sk.params), sk.params.x_bits, xm.shape[1], sk._eval_keys, rows)

    def matmul(self, ct: ConcreteCiphertext, w: "torch.Tensor | PlainWeights", *, transpose: bool = False) -> ConcreteResult:
        """Provider side: run the circuit compiled for ``w`` (or ``w.T``) on every row; no secret key."""
        if not isinstance(ct, ConcreteCiphertext):
            raise InvalidCiphertext(f"expected a ConcreteCiphertext, got {type(ct).__name__}")
        wm = _weights(w, transpose)
        if wm.shape[0] != ct.d:
            raise ShapeMismatch(f"ciphertext has {ct.d} features, weights{'.T' if transpose else ''} contract over {wm.shape[0]}")
        params = ConcreteParams(wm, ct.x_bits)
        if _circuit_id(params) != ct.circuit:
            raise ParameterError(
                "the ciphertext was encrypted for a circuit compiled with other weights or x_bits (or by "
                "another concrete version): the weights are a compile-time constant, so encrypt under "
                "params_for(these weights)"
            )
        server = _circuit(params).server
        try:
            keys = self._fhe.EvaluationKeys.deserialize(ct.eval_keys)
            outs = tuple(server.run(v, evaluation_keys=keys) for v in ct.values)
        except Exception as exc:  # malformed keys or values that parsed but do not fit the circuit
            raise InvalidCiphertext(f"the circuit refused the ciphertext: {exc}") from exc
        return ConcreteResult(ct.key_id, ct.circuit, ct.x_bits, wm.shape[1], outs)

    def decrypt(self, sk: ConcreteSecretKey, out: ConcreteResult) -> torch.Tensor:
        """The exact int64 product (tokens x d_out)."""
        if not isinstance(out, ConcreteResult):
            raise InvalidCiphertext(f"expected a ConcreteResult, got {type(out).__name__}")
        if out.key_id != sk.key_id:
            raise KeyMismatch(f"result was made under key {out.key_id.hex()}, not {sk.key_id.hex()}")
        if out.circuit != _circuit_id(sk.params):
            raise KeyMismatch("result comes from another circuit than this key's")
        try:
            rows = [np.asarray(sk._client.decrypt(v), dtype=np.int64).reshape(-1) for v in out.values]
        except Exception as exc:
            raise InvalidCiphertext(f"malformed concrete result: {exc}") from exc
        y = np.stack(rows)
        if y.shape != (out.tokens, out.d_out):
            raise InvalidCiphertext(f"result decrypts to shape {y.shape}, header says {(out.tokens, out.d_out)}")
        return torch.from_numpy(y)
