"""One request's encrypted product, computed a ring block at a time into the reply's bytes.

A provider answering on protocol 1.2 sends each block of the result as soon as it is computed (a
streamed reply, protocol README section 6), so a request holds about one block's output in memory
rather than the whole product's, and the client's download overlaps the provider's computation.
On 1.0 and 1.1 the same pieces are joined into one payload. Either way the bytes are exactly
``MatmulResult.to_bytes()`` of the whole product (fhe_backend's ``BlockProduct`` and
``ResultWriter``).

A cheating provider (cheat.py, tests and testnet only) needs the whole result to tamper with it:
it computes every block first, then hands out the tampered result's blocks.
"""

from __future__ import annotations

import time
from collections.abc import Hashable

import numpy as np

from cipherswarm.fhe_backend import Ciphertext, MatmulResult, PlainWeights
from cipherswarm.fhe_backend.ciphertext import ResultWriter, result_size
from cipherswarm.fhe_backend.evaluator import BlockProduct
from cipherswarm.fhe_backend.int8_limbs import Int8Gemm

from .cheat import Cheater

Block = tuple["np.ndarray | None", np.ndarray]


class Product:
    """The reply payload of one request, a block per `next_piece` call (worker threads, one at a
    time): the first piece starts with the result's header. `seconds` sums the compute time.
    Nothing here keeps a block's words once its bytes are returned."""

    def __init__(self, ct: Ciphertext, weights: PlainWeights, *, transpose: bool, method: str, gemm: Int8Gemm,
                 cheater: Cheater | None = None, kind: Hashable = None) -> None:
        self._product = BlockProduct(ct, weights, transpose=transpose, method=method, gemm=gemm)
        self._ct = ct
        self._writer = ResultWriter(ct.params, ct.key_id, ct.tokens, self._product.width,
                                    ct.seeds if self._product.shared else ())
        self.size = result_size(ct.params, ct.tokens, self._product.width)  # bytes of every piece together
        self._cheater, self._kind = cheater, kind
        self._tampered: MatmulResult | None = None
        self.remaining = ct.blocks
        self.seconds = 0.0

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def next_piece(self) -> bytes:
        """Compute the next block and return its bytes (the result's header first)."""
        if self.done:
            raise ValueError("every block was computed")
        start = time.perf_counter()
        piece = self._writer.block(*self._block(self._ct.blocks - self.remaining))
        self.remaining -= 1
        if self.done:
            self._tampered = None
        self.seconds += time.perf_counter() - start
        return piece

    def _block(self, blk: int) -> Block:
        if self._cheater is None:
            a, b = self._product.empty_block()
            self._product.block(blk, a, b)
            return a, b
        if self._tampered is None:  # a cheater tampers with the whole result, so computes it first
            self._tampered = self._cheater.result(self._kind, self._product.result())
        result = self._tampered
        return (None if result.a_words is None else result.a_words[blk]), result.b_words[blk]
