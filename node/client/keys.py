"""The client's secrets, one channel per (layer, direction): parameters, secret key, checker.

Parameters come from the layer's public norms (`Layer.stats`, the same integer weights providers
hold), so they are exact for every slice of the layer. The Freivalds checker of a channel keeps
secret sketches of the weights, not the weights (fhe_backend/verify.py): it is made from the
layer read once from the memory-mapped checkpoint (`ModelWeights.read`), one layer at a time, and
then serves every chunk of the layer, whatever its token blocks, contraction rows or column blocks.

In the shared-mask profile a key has a secret per contraction row (expanded from a seed) and is
bound to the layer: Z = W^T S (fhe_backend/shared_mask.py), N integers per output column, is
computed with the checker, from the same read of the layer, and a row chunk's binding (its rows'
share of Z) from one more read when a call first cuts those rows. Replies then carry no mask
product, so a block returns one word per real token and column. The price is the binding's
product (N tokens through the layer) and its memory: bindings are kept up to `binding_budget`
bytes (first come, first kept); past it a channel binds for each call and drops the binding
after its last concurrent user, trading memory for that product per call.

`rotate` replaces every secret key and drops every checker (their vectors are secrets too): a
provider that returned a wrong result has learnt something about the key from whether it was
accepted (fhe-scheme.md, "Verification"), so after a detected cheat nothing made under the old
secrets is used for new work. Work already encrypted under an older key keeps the checker it was
sent with; the next call's checker is sketched afresh from the file.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

from cipherswarm.fhe_backend import Params
from cipherswarm.fhe_backend.allocator import release_free_memory
from cipherswarm.fhe_backend.quant import Precision, QuantizedWeight
from cipherswarm.fhe_backend.shared_mask import SharedMaskKey
from cipherswarm.fhe_backend.verify import FreivaldsVerifier

from ..engine import ENGINE
from ..weights import Layer, ModelWeights
from .config import ClientConfig

#: encryption profiles a client of the swarm can use
CLIENT_PROFILES = ("default", "compact", "shared-mask", "compact-shared-mask")
#: the profile a client uses unless told otherwise (SwarmClient, the CLI, the simulator): exact and
#: needing nothing but a seed-sized key per layer. "shared-mask" is exact too, with about 0.6x the
#: bytes, but holds its keys' bindings (ClientConfig.binding_budget): a fixed budget, which for a
#: small model is several bytes per base weight
DEFAULT_PROFILE = "default"


class LayerChannel:
    """One layer and direction: parameters fixed for the client's life, a key and a checker that rotate."""

    def __init__(self, layer: Layer, ring: "KeyRing", *, x_bits: int, transpose: bool) -> None:
        self.layer = layer
        self.transpose = transpose
        self._ring = ring  # whose weights the layer is read from again after a rotation
        self.params: Params = ENGINE.params_for(layer.stats[transpose], x_bits, profile=ring.profile)
        self.key: Any = self._keygen()
        self._checker: FreivaldsVerifier | None = None
        self._lock = threading.RLock()
        self._width = layer.shape.d_in if transpose else layer.shape.d_out
        self._kept: set[tuple[int, int]] = set()  # row ranges whose bindings stay (shared mask)
        self._users: dict[tuple[bytes, int, int], int] = {}  # calls using a binding not kept

    def checker(self) -> FreivaldsVerifier:
        """The checker of the current key, sketched from the checkpoint on first use. Blocking
        (reads and sketches one layer): call it from a worker thread."""
        with self._lock:
            if self._checker is None:
                if self._ring.weights is None:
                    raise RuntimeError("the key ring has no model to read the layer from")
                self.prepare(self._ring.weights.read(self.layer.name).q)
            assert self._checker is not None
            return self._checker

    def _keygen(self) -> Any:
        shape = self.layer.shape
        return ENGINE.keygen(self.params, contraction=shape.d_out if self.transpose else shape.d_in)

    @property
    def shared_mask(self) -> bool:
        return isinstance(self.key, SharedMaskKey)

    def prepare(self, q: Any) -> None:
        """Sketch the current key's checker from the layer's integer weights `q`, already read, and
        bind a shared-mask key to them if the ring can keep the binding."""
        with self._lock:
            self._checker = FreivaldsVerifier.for_params(q, self.params, transpose=self.transpose)
            if self.shared_mask and not self.key.bound() and self._keeps(range(0, self.key.contraction)):
                self.key.bind(q, transpose=self.transpose)

    def _keeps(self, rows: range) -> bool:
        """Whether this channel keeps its binding over `rows`: decided once, by the ring's budget."""
        span = (rows.start, rows.stop)
        if span not in self._kept and self._ring.reserve(SharedMaskKey.binding_bytes(self.params, self._width)):
            self._kept.add(span)
        return span in self._kept

    def acquire(self, key: Any, rows: range) -> None:
        """Make sure the shared-mask `key` is bound over contraction `rows` before a call decrypts
        under it (a row chunk decrypts under its rows' share of Z), reading the layer if it is not:
        kept while the ring's budget allows, else for the calls using it now (`release` after each).
        Nothing to do for other keys. Blocking: call it from a worker thread."""
        if not isinstance(key, SharedMaskKey):
            return
        with self._lock:
            if not key.bound(rows):
                if self._ring.weights is None:
                    raise RuntimeError("the key ring has no model to read the layer from")
                key.bind(self._ring.weights.read(self.layer.name).q, transpose=self.transpose, rows=rows)
                release_free_memory()
            if not self._keeps(rows):
                use = (key.key_id, rows.start, rows.stop)
                self._users[use] = self._users.get(use, 0) + 1

    def close(self) -> None:
        """The channel is dropped: its bindings go, and their share of the ring's budget returns."""
        with self._lock:
            self._ring.reserve(-len(self._kept) * SharedMaskKey.binding_bytes(self.params, self._width))
            self._kept.clear()
            if self.shared_mask:
                self.key.unbind()

    def release(self, key: Any, rows: range) -> None:
        """A call that `acquire`d `rows` is done with them: a binding not kept goes with its last user."""
        if not isinstance(key, SharedMaskKey):
            return
        with self._lock:
            use = (key.key_id, rows.start, rows.stop)
            if use not in self._users:
                return  # kept
            self._users[use] -= 1
            if not self._users[use]:
                del self._users[use]
                key.unbind(rows)

    @property
    def prepared(self) -> bool:
        return self._checker is not None

    @property
    def state_bytes(self) -> int:
        """Bytes of secret state held for this channel: the checker's sketches and the key."""
        key_bytes = int(getattr(self.key, "nbytes", 0))
        return key_bytes + (self._checker.nbytes if self._checker is not None else 0)

    def rotate(self) -> None:
        with self._lock:
            self.key = self._keygen()
            self._checker = None


class KeyRing:
    """Every channel the client has opened; channels are made on first use, or while the model is
    loaded (`prepare_layer` as `load_model`'s visitor: one pass over the checkpoint for both).

    `profile`: the encryption profile of every channel: "default" (exact), "compact" (fewer bytes
    each way, approximate: fhe_backend/params.py), "shared-mask" (exact, replies without the mask
    product, keys bound to the layers: module docstring) or "compact-shared-mask" (both)."""

    def __init__(self, weights: ModelWeights | None = None, *, precision: Precision = Precision(), profile: str = DEFAULT_PROFILE,
                 binding_budget: int = ClientConfig.binding_budget) -> None:
        if profile not in CLIENT_PROFILES:
            raise ValueError(f"profile {profile!r} cannot run on the swarm; choose one of {', '.join(CLIENT_PROFILES)}")
        if binding_budget < 0:
            raise ValueError("binding_budget must be >= 0")
        self.weights = weights
        self.precision = precision
        self.profile = profile
        self.binding_budget = binding_budget
        self._kept_bytes = 0
        self._budget_lock = threading.Lock()
        self._channels: dict[tuple[str, bool], LayerChannel] = {}

    def reserve(self, nbytes: int) -> bool:
        """Take `nbytes` of the bindings' budget, if that much is left (a negative amount returns it)."""
        with self._budget_lock:
            if self._kept_bytes + nbytes > self.binding_budget:
                return False
            self._kept_bytes += nbytes
            return True

    def channel(self, layer: Layer, *, transpose: bool) -> LayerChannel:
        key = (layer.name, transpose)
        if key not in self._channels:
            self._channels[key] = LayerChannel(layer, self, x_bits=self.precision.x_bits(transpose), transpose=transpose)
        return self._channels[key]

    def prepare_layer(self, layer: Layer, quantized: QuantizedWeight) -> None:
        """Open both channels of `layer` and sketch their checkers from its integer weights, already read."""
        for transpose in (False, True):
            self.channel(layer, transpose=transpose).prepare(quantized.q)

    def prepare(self, directions: Iterable[tuple[str, bool]]) -> None:
        """Open the channels of `directions` ((layer key, transpose) pairs) and sketch their checkers,
        reading each layer (or group) once and holding one at a time. Blocking: call it from a worker thread."""
        if self.weights is None:
            raise RuntimeError("the key ring has no model to read the layers from")
        wanted: dict[str, list[bool]] = {}
        for key, transpose in directions:
            wanted.setdefault(self.weights.resolve(key).name, []).append(transpose)
        for name, transposes in wanted.items():
            channels = [self.channel(self.weights.resolve(name), transpose=t) for t in transposes]
            if all(ch.prepared for ch in channels):
                continue
            q = self.weights.read(name).q
            for ch in channels:
                ch.prepare(q)
            del q
            release_free_memory()  # the layer's transients, before the next one

    def keep_only(self, directions: Iterable[tuple[str, bool]]) -> None:
        """Prepare `directions` and close every other channel: the layers' own, once the trainer
        calls their groups instead (weights.py, "Groups"). Blocking: call it from a worker thread."""
        directions = list(directions)
        self.prepare(directions)
        assert self.weights is not None  # prepare checked it
        wanted = {(self.weights.resolve(key).name, t) for key, t in directions}
        for key in [k for k in self._channels if k not in wanted]:
            self._channels.pop(key).close()
        release_free_memory()

    def state_bytes(self) -> int:
        """Bytes of secret state of every open channel (sketches and keys)."""
        return sum(ch.state_bytes for ch in self._channels.values())

    def rotate(self) -> None:
        for channel in self._channels.values():
            channel.rotate()
