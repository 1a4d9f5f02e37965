"""``zama-glwe``: an adapter over Zama's concrete-ml-extensions GLWE matmul (optional, approximate).

This is the encrypted matmul Concrete ML's hybrid (LoRA) models run remotely, wrapped in this
package's :class:`~cipherswarm.fhe_backend.backend.Backend` API so the two engines can be compared
on equal terms. Install it with ``pip install 'cipherswarm[zama]'``; without it constructing the
backend raises :class:`BackendUnavailable`.

How it works (library defaults: GLWE k=1, N=2048, q=2^64, noise std 2^-48.3 q, the TFHE-rs 128-bit
parameter set):

* client: every token row is one seeded GLWE ciphertext per 2048 features; the mask is a seed, the
  body is stored modulo 2^39. The scale is ``Delta = 2^(64 - B)`` with ``B`` =
  ``bits_reserved_for_computation``: results are decoded modulo ``2^B`` (signed, two's complement).
* provider: per output column a GLWE x clear-polynomial product, then a packing keyswitch of the
  output LWEs into GLWEs stored modulo 2^26. The keyswitch needs the client's *compression key*
  (public, ~134 MB): :meth:`ZamaGlweBackend.public_key` / :meth:`ZamaGlweBackend.load_public_key`
  move it to a provider once; in one process :meth:`ZamaGlweBackend.keygen` registers it.

Limits measured on concrete-ml-extensions 0.2.0 (CPU build):

* **Approximate, not exact.** Decrypted values carry noise of standard deviation about
  ``2^(B-22.6)`` (measured; :func:`noise_std` bounds it by ``2^(B-22.2)``), so results are exact
  only while ``B <= 17`` and otherwise lie within :attr:`ZamaParams.tolerance` of ``x @ w``. ``B``
  is chosen as small as the weights and ``x_bits`` allow (int8 x int8 over 512 features: B = 24,
  tolerance 34, i.e. 2e-6 of the output range). Errors of one token row are correlated.
* Shapes: any tokens, ``d_in`` and ``d_out`` >= 1 work (measured d_in in 1..4096, including values
  that are not multiples of 2048, and d_out in 1..2049): the CPU build has no minimum dimension,
  small ones merely waste most of each 2048-slot GLWE (a row costs 10 KB up to 2048 features).
  Empty shapes and mismatched contractions are refused with :class:`ShapeMismatch`.
* ``B`` must be in [x_bits + 1, 48] (the library itself panics at B = 64 and its errors grow as
  ``2^B``): larger weight norms are refused with :class:`ParameterError`.
* Speed: the provider's packing keyswitch costs ~15 ms of CPU per output value whatever ``d_in``
  is (it barely uses a second core), so throughput is about ``d_in / 15 ms`` MAC/s: 3.5e4 at
  d_in = 512, 7e4 at 1024. Keygen takes 5-10 s; encryption ~1-2 us per value.
"""

from __future__ import annotations

import functools
import json
import math
import os
import struct
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from .encryptor import _as_int_matrix, check_range
from .errors import BackendUnavailable, InvalidCiphertext, KeyMismatch, ParameterError, ShapeMismatch
from .params import MAX_X_BITS, WeightStats
from .weights import PlainWeights, contraction_width

INSTALL_HINT = "pip install 'cipherswarm[zama]'"

#: largest bits_reserved_for_computation accepted: beyond it the absolute error exceeds 2^25
MAX_BITS = 48
#: a decoded value is outside the tolerance with probability below 2**-FAILURE_LOG2 (as in rlwe)
FAILURE_LOG2 = 64
#: sub-Gaussian tail factor: P(|X| > TAIL sigma) <= 2 exp(-TAIL^2 / 2) <= 2**-FAILURE_LOG2
TAIL = math.sqrt(2.0 * math.log(2.0) * (FAILURE_LOG2 + 1))
#: compression keys loaded from the wire that a provider keeps (each is ~134 MB)
MAX_LOADED_KEYS = 4
KEY_ID_BYTES = 8


@functools.lru_cache(maxsize=1)
def _fhext() -> Any:
    """concrete_ml_extensions, imported on first use so the package works without it."""
    try:
        import concrete_ml_extensions as fhext
    except ImportError as exc:
        raise BackendUnavailable(f"backend 'zama-glwe' needs concrete-ml-extensions: {INSTALL_HINT}") from exc
    return fhext


@functools.lru_cache(maxsize=1)
def _default_crypto() -> dict[str, Any]:
    return json.loads(_fhext().default_params())


def _native(call: Callable[..., Any], *args: Any, error: type[Exception], what: str) -> Any:
    """Run a library call, turning its Rust panics (``BaseException`` subclasses) into typed errors.

    The extension ``unwrap()``s on malformed bytes and on out-of-range parameters, which surfaces in
    Python as ``pyo3_runtime.PanicException`` that ``except Exception`` does not catch.
    """
    try:
        return call(*args)
    except (KeyboardInterrupt, SystemExit, GeneratorExit, MemoryError):
        raise
    except BaseException as exc:  # noqa: BLE001 - PanicException derives from BaseException
        raise error(f"{what}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc


# -- parameters and the noise model ------------------------------------------------------------------


def noise_std(crypto: dict[str, Any], w_l2sq: int) -> float:
    """Std bound of the decryption noise of one output value, in units of the ciphertext modulus q.

    Terms (variances; every rounding error is uniform, so strictly sub-Gaussian with its variance as
    proxy, and the terms summed for one value are independent because masks are uniform; key
    Hamming weights are bounded by the key dimension, the worst case, not the expected half):

    * input: the body is rounded to ``input_storage_ciphertext_modulus`` bits (the mask is a seed and
      stays exact), step s_in, plus fresh Gaussian noise: ``||w||_2^2 (s_in^2/12 + sigma^2)``;
    * packing keyswitch: the k_in N_in LWE mask coefficients are rounded to ``level * base_log``
      bits, ``k_in N_in s_ks^2 / 12``; and the key's noise polynomials, times digits below
      ``2^(base_log-1)``, reach every slot from each of the up to k_out N_out LWEs packed into one
      GLWE: ``k_out N_out level k_in N_in 4^(base_log-1) sigma_pks^2``;
    * output: every coefficient of the (k_out + 1) N_out output GLWE is rounded to
      ``output_storage_ciphertext_modulus`` bits: ``(1 + k_out N_out) s_out^2 / 12``.

    Measured noise is about 0.7x this bound (std 2.6 at B = 24 over 64 rows). The outputs of one
    token row share their GLWE's rounded mask and the binary key has a non-zero mean, so their
    errors are correlated (a common offset per row): averaging a row does not shrink them.
    """
    log_q = int(crypto["ciphertext_modulus_bit_count"])
    n_in = int(crypto["encryption_glwe_dimension"]) * int(crypto["polynomial_size"])
    n_out = int(crypto["packing_ks_glwe_dimension"]) * int(crypto["packing_ks_polynomial_size"])
    q = 2.0**log_q
    s_in = 2.0 ** (log_q - int(crypto["input_storage_ciphertext_modulus"]))
    s_ks = 2.0 ** (log_q - int(crypto["packing_ks_level"]) * int(crypto["packing_ks_base_log"]))
    s_out = 2.0 ** (log_q - int(crypto["output_storage_ciphertext_modulus"]))
    sigma_in = float(crypto["glwe_encryption_noise_distribution_stdev"]) * q
    sigma_pks = float(crypto["pks_noise_distrubution_stdev"]) * q
    digit = 2.0 ** (int(crypto["packing_ks_base_log"]) - 1)
    var = (
        w_l2sq * (s_in * s_in / 12.0 + sigma_in * sigma_in)
        + n_in * s_ks * s_ks / 12.0
        + n_out * int(crypto["packing_ks_level"]) * n_in * digit * digit * sigma_pks * sigma_pks
        + (1 + n_out) * s_out * s_out / 12.0
    )
    return math.sqrt(var) / q


@dataclass(frozen=True)
class ZamaParams:
    """One layer's encoding for the library's default crypto parameters; validated on construction.

    ``bits`` is the library's ``bits_reserved_for_computation``: results are decoded modulo 2^bits,
    so ``max|x @ w| + tolerance`` must stay below ``2^(bits-1)``.
    """

    x_bits: int  # activations are signed integers in [-2^(x_bits-1), 2^(x_bits-1) - 1]
    bits: int  # bits_reserved_for_computation
    w_l1: int  # weights' max column L1 norm these parameters are valid for
    w_l2sq: int  # weights' max column squared L2 norm (sets the input-noise term)

    FIELDS = ("x_bits", "bits", "w_l1", "w_l2sq")

    def __post_init__(self) -> None:
        for name in self.FIELDS:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool):
                raise ParameterError(f"{name} must be an int, got {type(v).__name__}")
        if not 2 <= self.x_bits <= MAX_X_BITS:
            raise ParameterError(f"x_bits must be in [2, {MAX_X_BITS}], got {self.x_bits}")
        if self.w_l1 < 1 or self.w_l2sq < 1:
            raise ParameterError("weight norms must be >= 1")
        if not self.x_bits + 1 <= self.bits <= MAX_BITS:
            raise ParameterError(
                f"zama-glwe needs {self.bits} result bits; it supports {self.x_bits + 1}..{MAX_BITS} "
                f"(weights with column L1 norm {self.w_l1} are too large for {self.x_bits}-bit activations)"
            )
        if self.y_max + self.tolerance >= 1 << (self.bits - 1):
            raise ParameterError(
                f"{self.bits} bits cannot hold max|y| = {self.y_max} plus the noise tolerance {self.tolerance}"
            )

    @property
    def y_max(self) -> int:
        """Largest |x @ w| for in-range activations and covered weights."""
        return (1 << (self.x_bits - 1)) * self.w_l1

    @property
    def crypto(self) -> dict[str, Any]:
        """The library's crypto-parameter dict: its defaults with ``bits_reserved_for_computation``."""
        return {**_default_crypto(), "bits_reserved_for_computation": self.bits}

    @property
    def sigma(self) -> float:
        """Bound on the std of the decryption noise, in units of one (integer) output value."""
        return noise_std(self.crypto, self.w_l2sq) * 2.0**self.bits

    @property
    def tolerance(self) -> int:
        """|decrypt(...) - x @ w| <= tolerance except with probability < 2**-FAILURE_LOG2 per value.

        Decoding rounds ``y + e/Delta`` to the nearest integer, so the integer error is at most
        ``TAIL * sigma + 1/2`` rounded down. It is 0 (exact) while ``bits <= 17``.
        """
        return int(math.floor(TAIL * self.sigma + 0.5))

    def for_weights(self, stats: WeightStats) -> None:
        """Raise :class:`ParameterError` unless these parameters cover weights with ``stats``."""
        if not WeightStats(self.w_l1, self.w_l2sq).covers(stats):
            raise ParameterError(
                f"parameters were chosen for weights with column L1 <= {self.w_l1} and L2^2 <= {self.w_l2sq}; "
                f"these weights have {stats.l1} and {stats.l2sq}: results could wrap modulo 2^{self.bits}"
            )

    def to_tuple(self) -> tuple[int, ...]:
        return tuple(getattr(self, f) for f in self.FIELDS)


def choose_zama_params(stats: WeightStats, x_bits: int) -> ZamaParams:
    """Smallest ``bits`` that holds ``max|y|`` plus its own noise tolerance (smaller bits, less error)."""
    if not isinstance(x_bits, int) or isinstance(x_bits, bool) or not 2 <= x_bits <= MAX_X_BITS:
        raise ParameterError(f"x_bits must be an int in [2, {MAX_X_BITS}], got {x_bits!r}")
    y_max = (1 << (x_bits - 1)) * stats.l1
    bits = max(x_bits + 1, y_max.bit_length() + 1)
    while bits <= MAX_BITS:
        try:
            return ZamaParams(x_bits=x_bits, bits=bits, w_l1=stats.l1, w_l2sq=stats.l2sq)
        except ParameterError:
            bits += 1
    return ZamaParams(x_bits=x_bits, bits=bits, w_l1=stats.l1, w_l2sq=stats.l2sq)  # raises, with the reason


# -- keys --------------------------------------------------------------------------------------------


class _CompressionKey:
    """The provider's public key material (the packing-keyswitch key), held by key id."""

    __slots__ = ("key_id", "inner", "__weakref__")

    def __init__(self, key_id: bytes, inner: Any) -> None:
        self.key_id = key_id
        self.inner = inner


_KEYS_LOCK = threading.Lock()
#: keys made by keygen in this process: alive as long as their secret key is
_OWN_KEYS: "weakref.WeakValueDictionary[bytes, _CompressionKey]" = weakref.WeakValueDictionary()
#: keys loaded from the wire (provider side), least recently used first
_LOADED_KEYS: "OrderedDict[bytes, _CompressionKey]" = OrderedDict()


def _find_key(key_id: bytes) -> _CompressionKey:
    with _KEYS_LOCK:
        key = _OWN_KEYS.get(key_id) or _LOADED_KEYS.get(key_id)
        if key is not None and key_id in _LOADED_KEYS:
            _LOADED_KEYS.move_to_end(key_id)
    if key is None:
        raise KeyMismatch(
            f"no compression key with id {key_id.hex()} on this provider: the client must send "
            "ZamaGlweBackend.public_key(sk) once and the provider load it with load_public_key"
        )
    return key


@dataclass(frozen=True, eq=False, repr=False)
class ZamaSecretKey:
    """The client's GLWE secret key (never serialised) plus its public compression key."""

    params: ZamaParams
    key_id: bytes  # public random label, also names the compression key on providers
    _private: Any = field(repr=False)
    _public: _CompressionKey = field(repr=False)

    def for_params(self, params: ZamaParams) -> "ZamaSecretKey":
        """The same key material with another layer's encoding (keys do not depend on ``bits``).

        Key generation takes ~10 s and a 134 MB compression key, so one key serves every layer.
        """
        return ZamaSecretKey(params, self.key_id, self._private, self._public)

    def __repr__(self) -> str:
        return f"ZamaSecretKey(id={self.key_id.hex()}, bits={self.params.bits}, x_bits={self.params.x_bits})"

    def __reduce__(self) -> Any:
        raise TypeError("a ZamaSecretKey is never serialised; only public_key(sk) leaves the client")


# -- wire forms --------------------------------------------------------------------------------------

_PARAMS = struct.Struct("<BBQQ")
_CT_HEAD = struct.Struct("<4s8s" + _PARAMS.format[1:] + "IIQ")
_KEY_HEAD = struct.Struct("<4s8sQ")
CT_MAGIC, OUT_MAGIC, KEY_MAGIC = b"CZX1", b"CZY1", b"CZK1"
MAX_DIM = 1 << 20
MAX_TOKENS = 1 << 24


def _params_from(values: tuple[int, ...]) -> ZamaParams:
    try:
        return ZamaParams(*(int(v) for v in values))
    except ParameterError as exc:
        raise InvalidCiphertext(f"ciphertext carries invalid parameters: {exc}") from exc


def _frame(magic: bytes, key_id: bytes, params: ZamaParams, rows: int, cols: int, payload: bytes) -> bytes:
    return _CT_HEAD.pack(magic, key_id, *params.to_tuple(), rows, cols, len(payload)) + payload


def _unframe(data: bytes | bytearray | memoryview, magic: bytes, what: str) -> tuple[bytes, ZamaParams, int, int, bytes]:
    data = memoryview(data)
    if len(data) < _CT_HEAD.size:
        raise InvalidCiphertext(f"{what} truncated: {len(data)} bytes, header needs {_CT_HEAD.size}")
    got, key_id, *rest = _CT_HEAD.unpack_from(data)
    if got != magic:
        raise InvalidCiphertext(f"not a zama-glwe {what} (bad magic)")
    params = _params_from(tuple(rest[:4]))
    rows, cols, size = rest[4:]
    if not 1 <= rows <= MAX_TOKENS or not 1 <= cols <= MAX_DIM:
        raise InvalidCiphertext(f"{what} dimensions out of range: {rows} x {cols}")
    if len(data) != _CT_HEAD.size + size:
        raise InvalidCiphertext(f"{what} has {len(data)} bytes, header says {_CT_HEAD.size + size}")
    return key_id, params, rows, cols, bytes(data[_CT_HEAD.size :])


@dataclass(frozen=True, eq=False)
class ZamaCiphertext:
    """Encrypted activations (tokens x d): one seeded GLWE list per token row."""

    params: ZamaParams
    key_id: bytes
    tokens: int
    d: int
    inner: Any = field(repr=False)  # concrete_ml_extensions.EncryptedMatrix

    def to_bytes(self) -> bytes:
        return _frame(CT_MAGIC, self.key_id, self.params, self.tokens, self.d, bytes(self.inner.serialize()))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "ZamaCiphertext":
        key_id, params, tokens, d, payload = _unframe(data, CT_MAGIC, "ciphertext")
        inner = _native(_fhext().EncryptedMatrix.deserialize, payload, error=InvalidCiphertext,
                        what="malformed zama-glwe ciphertext payload")
        return cls(params, key_id, tokens, d, inner)


@dataclass(frozen=True, eq=False)
class ZamaResult:
    """Encrypted product (tokens x d_out): per token row, compressed GLWEs of 2048 outputs each."""

    params: ZamaParams
    key_id: bytes
    tokens: int
    d_out: int
    inner: Any = field(repr=False)  # concrete_ml_extensions.CompressedResultEncryptedMatrix

    def to_bytes(self) -> bytes:
        return _frame(OUT_MAGIC, self.key_id, self.params, self.tokens, self.d_out, bytes(self.inner.serialize()))

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "ZamaResult":
        key_id, params, tokens, d_out, payload = _unframe(data, OUT_MAGIC, "result")
        inner = _native(_fhext().CompressedResultEncryptedMatrix.deserialize, payload, error=InvalidCiphertext,
                        what="malformed zama-glwe result payload")
        return cls(params, key_id, tokens, d_out, inner)


# -- the backend -------------------------------------------------------------------------------------


def _crypto_object(params: ZamaParams) -> Any:
    fhext = _fhext()
    return _native(fhext.MatmulCryptoParameters.deserialize, json.dumps(params.crypto), error=ParameterError,
                   what="concrete-ml-extensions refused the crypto parameters")


class ZamaGlweBackend:
    """Approximate encrypted ``x @ w`` with concrete-ml-extensions (see the module docstring for limits)."""

    name = "zama-glwe"
    exact = False
    Ciphertext = ZamaCiphertext
    Result = ZamaResult

    def __init__(self) -> None:
        self._fhext = _fhext()  # raises BackendUnavailable when the extra is not installed

    def params_for(self, w: "torch.Tensor | PlainWeights", x_bits: int = 8, *, transpose: bool = False) -> ZamaParams:
        """Smallest-error encoding for products with ``w`` (or ``w.T``) and ``x_bits``-bit inputs."""
        stats = w.stats(transpose) if isinstance(w, PlainWeights) else WeightStats.of(w, transpose=transpose)
        return choose_zama_params(stats, x_bits)

    def keygen(self, params: ZamaParams) -> ZamaSecretKey:
        """A fresh GLWE key and its compression key, from the library's own CSPRNG (~10 s, 134 MB).

        The compression key is registered in this process under a random key id, so a provider in
        the same process can multiply at once; other processes need :meth:`load_public_key`.
        """
        if not isinstance(params, ZamaParams):
            raise ParameterError(f"expected ZamaParams, got {type(params).__name__}")
        private, compression = _native(self._fhext.create_private_key, _crypto_object(params), error=ParameterError,
                                       what="key generation failed")
        key_id = os.urandom(KEY_ID_BYTES)
        public = _CompressionKey(key_id, compression)
        with _KEYS_LOCK:
            _OWN_KEYS[key_id] = public
        return ZamaSecretKey(params, key_id, private, public)

    @staticmethod
    def public_key(sk: ZamaSecretKey) -> bytes:
        """The compression key (public evaluation key) to send to providers once: ~134 MB."""
        blob = bytes(sk._public.inner.serialize())
        return _KEY_HEAD.pack(KEY_MAGIC, sk.key_id, len(blob)) + blob

    def load_public_key(self, data: bytes | bytearray | memoryview) -> bytes:
        """Provider side: keep a client's compression key (the most recent few); returns its key id."""
        data = memoryview(data)
        if len(data) < _KEY_HEAD.size:
            raise InvalidCiphertext("public key truncated")
        magic, key_id, size = _KEY_HEAD.unpack_from(data)
        if magic != KEY_MAGIC or len(data) != _KEY_HEAD.size + size:
            raise InvalidCiphertext("not a zama-glwe public key (bad magic or length)")
        inner = _native(self._fhext.deserialize_compression_key, bytes(data[_KEY_HEAD.size :]),
                        error=InvalidCiphertext, what="malformed zama-glwe compression key")
        with _KEYS_LOCK:
            _LOADED_KEYS[key_id] = _CompressionKey(key_id, inner)
            _LOADED_KEYS.move_to_end(key_id)
            while len(_LOADED_KEYS) > MAX_LOADED_KEYS:
                _LOADED_KEYS.popitem(last=False)
        return key_id

    def encrypt(self, sk: ZamaSecretKey, x: torch.Tensor) -> ZamaCiphertext:
        """Encrypt signed ``x_bits``-bit activations (tokens x d), one GLWE list per token row."""
        xm = _as_int_matrix(x, "activations")
        check_range(xm, sk.params.x_bits)
        data = np.ascontiguousarray(xm, dtype=np.int64).view(np.uint64)  # two's complement mod 2^64
        inner = _native(self._fhext.encrypt_matrix, sk._private, _crypto_object(sk.params), data,
                        error=ParameterError, what="encryption failed")
        return ZamaCiphertext(sk.params, sk.key_id, xm.shape[0], xm.shape[1], inner)

    def matmul(self, ct: ZamaCiphertext, w: "torch.Tensor | PlainWeights", *, transpose: bool = False) -> ZamaResult:
        """Provider side: encrypted ``x @ w`` (or ``x @ w.T``) with the client's public compression key."""
        if not isinstance(ct, ZamaCiphertext):
            raise InvalidCiphertext(f"expected a ZamaCiphertext, got {type(ct).__name__}")
        pw = PlainWeights.of(w)
        contraction, width = contraction_width(pw, transpose)
        if ct.d != contraction:
            raise ShapeMismatch(f"ciphertext has {ct.d} features, weights{'.T' if transpose else ''} contract over {contraction}")
        if width < 1:
            raise ShapeMismatch("weights have no output columns")
        ct.params.for_weights(pw.stats(transpose))
        key = _find_key(ct.key_id)
        w64 = pw.i64().numpy()
        clear = np.ascontiguousarray(w64.T if transpose else w64).view(np.uint64)
        inner = _native(self._fhext.matrix_multiplication, ct.inner, clear, key.inner,
                        error=InvalidCiphertext, what="the library refused the ciphertext")
        return ZamaResult(ct.params, ct.key_id, ct.tokens, width, inner)

    def decrypt(self, sk: ZamaSecretKey, out: ZamaResult) -> torch.Tensor:
        """The int64 product (tokens x d_out), within ``sk.params.tolerance`` of ``x @ w``."""
        if not isinstance(out, ZamaResult):
            raise InvalidCiphertext(f"expected a ZamaResult, got {type(out).__name__}")
        if out.key_id != sk.key_id:
            raise KeyMismatch(f"result was made under key {out.key_id.hex()}, not {sk.key_id.hex()}")
        if out.params != sk.params:
            raise KeyMismatch(f"result was encoded with {out.params}, the key with {sk.params}: use sk.for_params(out.params)")
        n_out = int(out.params.crypto["packing_ks_polynomial_size"])
        last = out.d_out % n_out or n_out
        raw = _native(self._fhext.decrypt_matrix, out.inner, sk._private, _crypto_object(sk.params), last,
                      error=InvalidCiphertext, what="malformed zama-glwe result")
        raw = np.asarray(raw)
        if raw.shape != (out.tokens, out.d_out):
            raise InvalidCiphertext(f"result decrypts to shape {raw.shape}, header says {(out.tokens, out.d_out)}")
        bits = out.params.bits
        half = np.uint64(1 << (bits - 1))
        mask = np.uint64((1 << bits) - 1)
        centred = ((raw.astype(np.uint64) + half) & mask).astype(np.int64) - np.int64(1 << (bits - 1))
        return torch.from_numpy(centred)
