"""The client's secrets, one channel per (layer, direction): parameters, secret key, checkers.

Parameters come from the same int8 weights providers hold (`params_for(W_q, x_bits,
transpose=...)`), so they are exact for every slice of the layer. Freivalds checkers are made per
weight slice and chunk parameters on first use, each with its own secret random vectors.

`rotate` replaces every secret key and drops every checker (their vectors are secrets too): a
provider that returned a wrong result has learnt something about the key from whether it was
accepted (fhe-scheme.md, "Verification"), so after a detected cheat nothing made under the old
secrets is used again. Each rotation starts a new `generation`; work encrypted under an older one
asks for checkers of its own generation, so a late checker of the old secrets can never serve
the new key.
"""

from __future__ import annotations

from typing import Any

from cipherswarm.fhe_backend import Params
from cipherswarm.fhe_backend.verify import FreivaldsVerifier
from cipherswarm.protocol import WeightSlice

from ..engine import ENGINE
from ..weights import Layer


class LayerChannel:
    """One layer and direction: parameters fixed for the client's life, a key that may rotate."""

    def __init__(self, layer: Layer, *, x_bits: int, transpose: bool) -> None:
        if layer.weight is None:
            raise ValueError(f"{layer.name}: the client needs every layer's weights")
        self.layer = layer
        self.transpose = transpose
        self._q = layer.weight.q
        self.params: Params = ENGINE.params_for(self._q, x_bits, transpose=transpose)
        self.key: Any = ENGINE.keygen(self.params)
        self.generation = 0
        self._checkers: dict[tuple[int, WeightSlice, Params], FreivaldsVerifier] = {}

    def checker(self, part: WeightSlice, params: Params, *, generation: int) -> FreivaldsVerifier:
        """The Freivalds checker for products with W[part] under `params` (a chunk's parameters).
        Safe to call from worker threads: a race only computes a checker twice."""
        key = (generation, part, params)
        checker = self._checkers.get(key)
        if checker is None:
            w = self._q[part.rows.start : part.rows.stop, part.cols.start : part.cols.stop]
            checker = self._checkers[key] = FreivaldsVerifier.for_params(w, params, transpose=self.transpose)
        return checker

    def rotate(self) -> None:
        self.key = ENGINE.keygen(self.params)
        self.generation += 1
        self._checkers.clear()


class KeyRing:
    """Every channel the client has opened; channels are made on first use."""

    def __init__(self, *, x_bits: int) -> None:
        self.x_bits = x_bits
        self._channels: dict[tuple[str, bool], LayerChannel] = {}

    def channel(self, layer: Layer, *, transpose: bool) -> LayerChannel:
        key = (layer.name, transpose)
        if key not in self._channels:
            self._channels[key] = LayerChannel(layer, x_bits=self.x_bits, transpose=transpose)
        return self._channels[key]

    def rotate(self) -> None:
        for channel in self._channels.values():
            channel.rotate()
