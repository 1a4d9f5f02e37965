"""Deliberate misbehaviour of a provider, to prove that clients catch it.

Used by the tests and by the testnet's "malicious provider" option through the provider's hidden
`--cheat` flag, so that what is tested is a real provider process on the wire, not a mock. Every
mode returns a well-formed, properly signed reply; only its content is wrong:

- `random`: result words drawn at random (garbage after decryption);
- `flip`: one output value shifted by one (B'' of block 0, column 0, token 0 gains delta);
- `stale`: the previous result for the same layer, slice and shapes, replayed (the first request of
  a kind is answered honestly and remembered);
- `wrong-weights`: the product with other weights: the slice's first row negated (the same norms,
  so the request's parameters still admit them);
- `overbill`: an honest result, but a receipt signed at twice the price it advertises (at least 2).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Hashable
from typing import TypeVar

import numpy as np
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cipherswarm.fhe_backend import MatmulResult, PlainWeights
from cipherswarm.protocol import MatmulReply, ReplyTrailer, sign_receipt

R = TypeVar("R", MatmulReply, ReplyTrailer)


class Cheat(enum.Enum):
    RANDOM = "random"
    FLIP = "flip"
    STALE = "stale"
    WRONG_WEIGHTS = "wrong-weights"
    OVERBILL = "overbill"


class Cheater:
    """Applies one Cheat mode to a provider's weights and results."""

    def __init__(self, mode: Cheat) -> None:
        self.mode = mode
        self._previous: dict[Hashable, MatmulResult] = {}

    def weights(self, weights: PlainWeights) -> PlainWeights:
        if self.mode is not Cheat.WRONG_WEIGHTS:
            return weights
        other = weights.w.clone()
        other[0] = -other[0]  # same norms, so the layer's parameters still accept it
        return PlainWeights(other)

    def reply(self, reply: R, key: Ed25519PrivateKey) -> R:
        """The reply (or a streamed reply's trailer) to send: for `overbill`, its receipt signed
        again (with the provider's `key`) at twice its price."""
        if self.mode is not Cheat.OVERBILL or reply.receipt is None:
            return reply
        receipt = reply.receipt.receipt
        dearer = dataclasses.replace(receipt, price_per_gmac=2 * max(1, receipt.price_per_gmac))
        return dataclasses.replace(reply, receipt=sign_receipt(dearer, key))

    def result(self, kind: Hashable, result: MatmulResult) -> MatmulResult:
        """The result to send for a request of `kind` (layer, slice, direction, shape)."""
        p = result.params
        if self.mode is Cheat.RANDOM:
            rng = np.random.default_rng()
            a = None if result.a_words is None else rng.integers(0, 1 << p.out_bits_a, result.a_words.shape, dtype=np.int64)
            return dataclasses.replace(result, a_words=a, b_words=rng.integers(0, 1 << p.out_bits_b, result.b_words.shape, dtype=np.int64))
        if self.mode is Cheat.FLIP:
            b = result.b_words.copy()
            step = round(p.delta * 2**p.out_bits_b / p.q)  # delta, rounded to B'' as the provider sends it
            b[0, 0, 0] = (b[0, 0, 0] + step) % (1 << p.out_bits_b)
            return dataclasses.replace(result, b_words=b)
        if self.mode is Cheat.STALE:
            previous = self._previous.get(kind)
            self._previous[kind] = result
            return result if previous is None else previous
        return result
