"""The provider's int8-limb product: encrypted ``A @ W`` and ``B @ W`` as int8 x int8 -> int32 GEMMs.

GPUs, consumer ones included, multiply int8 matrices on their tensor cores far faster than in any
other precision. The ciphertext words (mod ``q = 2^log_q``, ``log_q <= 64``) are split into
``ceil(log_q / 8)`` centred 8-bit limbs; every limb matrix times the int8 weights is one GEMM with
int32 accumulation, over contraction pieces short enough that int32 cannot overflow (``MAX_CHUNK``).
The pieces are summed in int64, and :func:`kernels.join_limbs_switch` (the float64 path's own code)
recombines the limbs with shifts mod 2^64, reduces mod q and applies the output modulus switch, so
the result is bit-identical to ``evaluator.matmul(..., method="f64")``. The evaluator calls
:func:`limb_products` once per tile of contraction rows and output columns, so its buffers stay
within the evaluator's scratch bound whatever the layer's size.

Only the raw GEMM depends on the device (:data:`Int8Gemm`): :func:`cpu_int8_gemm` here,
:func:`cuda_int8_gemm` through cuBLAS on a GPU. Splitting, chunking, accumulation and recombination
are this module's code on both, so the CPU tests cover the limb arithmetic a GPU provider runs, and
``selfcheck.self_check`` compares a device's GEMM with the CPU before a provider serves with it.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch

from .errors import BackendUnavailable, InputRangeError
from . import kernels
from .ring import limb_count

LIMB_BITS = 8
#: largest |limb| and |weight|: limbs are centred in [-128, 127], weights are int8 in [-128, 127]
_INT8_ABS_MAX = 128
_INT32_MAX = (1 << 31) - 1
#: Contraction rows per GEMM. One term of a limb GEMM is at most 128 * 128 = 2^14 in absolute value
#: (only (-128) * (-128) reaches it; the most negative term is -128 * 127), so a sum of k terms
#: stays in int32 for every input exactly when k * 2^14 <= 2^31 - 1, i.e. k <= 131071. The chunk is
#: the largest such k that is a multiple of 4 (cuBLAS int8 GEMMs want leading dimensions that are),
#: 131068: a whole LLaMA-size contraction (<= 14336) is one GEMM, and nothing can overflow whatever
#: the weights.
MAX_CHUNK = (_INT32_MAX // (_INT8_ABS_MAX * _INT8_ABS_MAX)) // 4 * 4
#: Rows per GEMM actually used (<= MAX_CHUNK); smaller values cost more GEMM calls, nothing else.
GEMM_CHUNK = MAX_CHUNK

Int8Gemm = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""A device's raw GEMM: ``(a, b) -> a @ b`` for int8 ``a`` (m, k) and ``b`` (k, n), as an int32
(m, n) host array accumulated in int32 (the callers keep k <= MAX_CHUNK, so it never wraps)."""


def check_weights(w: torch.Tensor) -> None:
    """Refuse weights outside [-128, 127] with :class:`InputRangeError`: the int8 path multiplies
    the weights as int8 tiles, so anything wider would be silently wrapped (the float64 path takes
    them). int8 weights, every quantized layer, pass without a look."""
    if w.dtype == torch.int8 or not w.numel():
        return
    if int(w.min()) < -_INT8_ABS_MAX or int(w.max()) > _INT8_ABS_MAX - 1:
        raise InputRangeError(
            f"the int8 product needs weights in [-128, 127], got [{int(w.min())}, {int(w.max())}]; use method='f64'"
        )


def limb_products(rows: Sequence[np.ndarray], left: np.ndarray, log_q: int, gemm: Int8Gemm) -> np.ndarray:
    """``left @ limb_l(words)`` for every words matrix in ``rows`` and every limb l, exact in int64.

    rows: (d, n) int64 word matrices (A and B, or B alone); left: (width, d) int8. Returns a
    (len(rows) * limbs, width, n) int64 view, in the layout ``kernels.join_limbs_switch`` reads.
    All limbs of all rows form one wide GEMM per contraction piece of GEMM_CHUNK rows.
    """
    if not 1 <= GEMM_CHUNK <= MAX_CHUNK:
        raise ValueError(f"GEMM_CHUNK must be in [1, {MAX_CHUNK}] so int32 cannot overflow, got {GEMM_CHUNK}")
    limbs = limb_count(log_q, LIMB_BITS)
    d, n = rows[0].shape
    z = np.empty((d, len(rows), limbs, n), dtype=np.int8)
    for r, words in enumerate(rows):
        kernels.split_limbs(words, log_q, LIMB_BITS, z[:, r].transpose(1, 0, 2))  # (limbs, d, n) view
    z = z.reshape(d, len(rows) * limbs * n)
    width = left.shape[0]
    acc = np.zeros((width, z.shape[1]), dtype=np.int64)
    for start in range(0, d, GEMM_CHUNK):
        acc += gemm(left[:, start : start + GEMM_CHUNK], z[start : start + GEMM_CHUNK])
    return acc.reshape(width, len(rows) * limbs, n).transpose(1, 0, 2)


def cpu_int8_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The CPU's :data:`Int8Gemm` (torch int32 matmul, which wraps as int32 hardware does): the
    reference the tests and ``selfcheck.self_check`` hold every device to."""
    return torch.matmul(torch.from_numpy(a).to(torch.int32), torch.from_numpy(b).to(torch.int32)).numpy()


def _cupy() -> Any:
    try:
        import cupy
    except ImportError as exc:
        raise BackendUnavailable("the CUDA product needs cupy: pip install 'cipherswarm[gpu]'") from exc
    return cupy


# cudaDataType values of int8 and int32 matrices (library_types.h)
_CUDA_R_8I, _CUDA_R_32I = 3, 10
_ONE, _ZERO = np.ones(1, dtype=np.int32), np.zeros(1, dtype=np.int32)


def cuda_device() -> Any:
    """cupy, once at least one CUDA device answers; BackendUnavailable saying why otherwise."""
    cupy = _cupy()
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except cupy.cuda.runtime.CUDARuntimeError as exc:
        raise BackendUnavailable(f"no usable CUDA device ({exc})") from None
    if count == 0:
        raise BackendUnavailable("no CUDA device")
    return cupy


def _pad4(x: int) -> int:
    return -(-x // 4) * 4


def cublas_int8_gemm(a: Any, b: Any) -> Any:
    """``a @ b`` for int8 cupy arrays a (m, k) and b (k, n) as an int32 cupy array, by cuBLAS GemmEx.

    ``cupy.matmul`` on int8 runs cupy's own integer kernel, not the tensor cores; GemmEx with int8
    inputs and CUBLAS_COMPUTE_32I does, in its "TN" form (both operands contiguous along k) with
    leading dimensions that are multiples of 4. So b is transposed on the device and every
    dimension is zero-padded to a multiple of 4 (zero rows and columns add nothing).
    """
    cupy = _cupy()
    from cupy_backends.cuda.libs import cublas

    (m, k), n = a.shape, b.shape[1]
    m4, k4, n4 = _pad4(m), _pad4(k), _pad4(n)
    a4 = cupy.zeros((m4, k4), dtype=cupy.int8)
    a4[:m, :k] = a
    bt4 = cupy.zeros((n4, k4), dtype=cupy.int8)
    bt4[:n, :k] = b.T
    c = cupy.empty((m4, n4), dtype=cupy.int32)
    handle = cupy.cuda.device.get_cublas_handle()
    cublas.setStream(handle, cupy.cuda.get_current_stream().ptr)
    # row-major c (m, n) is column-major c^T (n x m) = bt4 (k x n, column-major, transposed) x a4^T
    cublas.gemmEx(
        handle, cublas.CUBLAS_OP_T, cublas.CUBLAS_OP_N, n4, m4, k4,
        _ONE.ctypes.data, bt4.data.ptr, _CUDA_R_8I, k4, a4.data.ptr, _CUDA_R_8I, k4,
        _ZERO.ctypes.data, c.data.ptr, _CUDA_R_32I, n4, cublas.CUBLAS_COMPUTE_32I, cublas.CUBLAS_GEMM_DEFAULT,
    )
    return c[:m, :n]


def cuda_int8_gemm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The GPU's :data:`Int8Gemm`: host operands in, host int32 product out, cuBLAS in between.
    :class:`BackendUnavailable` when cupy is missing; cupy's CUDA errors when there is no GPU."""
    cupy = _cupy()
    return cupy.asnumpy(cublas_int8_gemm(cupy.asarray(a), cupy.asarray(b)))
