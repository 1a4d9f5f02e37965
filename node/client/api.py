"""The client for synchronous code (the trainer): a SwarmSession on its own trio thread.

    with SwarmClient(model_dir="path/to/hf-model", bootstrap=["/ip4/.../p2p/12D3Koo..."]) as client:
        y = client.matmul("model.layers.0.self_attn.q_proj", x_int, transpose=False)

The trio loop runs in a dedicated thread started by `__enter__` (or `start`) and stopped by
`__exit__` (or `close`); `matmul` and `stats` are submitted to it with `trio.from_thread` and block
the calling thread until done, so torch code calls the swarm like a local function. Call them from
any thread except the client's own.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from multiaddr import Multiaddr

from cipherswarm.fhe_backend.quant import Precision

from ..errors import ClientClosedError
from ..identity import hold_identity, home_dir, load_identity
from ..ledger import Ledger
from ..types import ClientStats
from ..weights import ModelWeights, check_digests, load_model
from .config import ClientConfig
from .keys import DEFAULT_PROFILE, KeyRing
from .session import SwarmSession, open_session


class SwarmClient:
    """Exact encrypted products of a model's base layers, computed by the swarm.

    The client holds none of the model's base weights: `start` reads each remote layer of
    `model_dir` once, one at a time, keeps its public summary (`ModelWeights` with `hold=False`) and
    the secret Freivalds sketches its checks need, a few hundredths of a byte per weight.

    `weights`: the model's summaries if already loaded (the trainer's thin model shares them);
    default: loaded from `model_dir` by `start`.
    `precision`: bits of activations, gradients and weights; the weights' must be the providers'
    (they are part of the model hash), and the activations' those the trainer quantizes to.
    `profile`: the encryption profile (keys.CLIENT_PROFILES): "default" (keys.DEFAULT_PROFILE: exact,
    the mask product returned, no binding), "compact" (about 30% fewer bytes each way, products
    approximate within a bound the checks enforce: fhe_backend/params.py), "shared-mask" (exact,
    replies without the mask product, uploads rounded, keys bound to the layers within
    `config.binding_budget`: keys.py) or "compact-shared-mask" (both).
    `prepare`: open every layer's channels (keys and sketches) in `start` rather than at first use,
    so that memory and start-up cost are paid, and errors seen, before training.
    `identity`: key file of the client (created if missing); None: a fresh key each run.
    `ledger`: SQLite file of receipts and permanent bans; default ~/.cipherswarm/client.sqlite.
    `min_providers`: providers to find before `__enter__` returns (within `config.wait_providers_s`).
    """

    def __init__(
        self,
        *,
        model_dir: str | Path,
        weights: ModelWeights | None = None,
        prepare: bool = True,
        bootstrap: Sequence[str | Multiaddr] = (),
        precision: Precision = Precision(),
        profile: str = DEFAULT_PROFILE,
        identity: str | Path | None = None,
        ledger: str | Path | None = None,
        listen: str | Multiaddr = "/ip4/127.0.0.1/tcp/0",
        min_providers: int = 1,
        config: ClientConfig = ClientConfig(),
    ) -> None:
        if weights is not None and weights.weight_bits != precision.weight_bits:
            raise ValueError(f"the weights were loaded at {weights.weight_bits} bits, the precision asks for {precision.weight_bits}")
        self.model_dir = Path(model_dir)
        self.bootstrap = [Multiaddr(str(a)) for a in bootstrap]
        self.precision = precision
        # ValueError now for a profile it cannot run
        self.keys = KeyRing(precision=precision, profile=profile, binding_budget=config.binding_budget)
        self.identity = None if identity is None else Path(identity)
        self.ledger_path = Path(ledger) if ledger is not None else home_dir() / "client.sqlite"
        self.listen = Multiaddr(str(listen))
        self.min_providers = min_providers
        self.config = config
        self.prepare = prepare
        self.weights: ModelWeights | None = weights
        self._session: SwarmSession | None = None
        self._token: trio.lowlevel.TrioToken | None = None
        self._stop: trio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._prepared = False  # channels opened while the model was read
        self._error: BaseException | None = None

    def __enter__(self) -> SwarmClient:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Load the layers' summaries, start the host thread and wait until the providers are found."""
        if self._thread is not None:
            raise RuntimeError("the client is already started")
        if self.weights is None:  # with prepare, one pass over the checkpoint: summaries and sketches
            self.weights = load_model(self.model_dir, hold=False, weight_bits=self.precision.weight_bits,
                                      visit=self.keys.prepare_layer if self.prepare else None)
            self._prepared = self.prepare
        self._thread = threading.Thread(target=self._thread_main, args=(self.weights,), name="cipherswarm-client", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            self._thread.join()
            self._thread = None
            raise ClientClosedError("the client failed to start") from self._error

    def _thread_main(self, weights: ModelWeights) -> None:
        try:
            trio.run(self._main, weights)
        except BaseException as exc:  # handed to the starting thread, or chained by later calls
            self._error = exc
        finally:
            self._ready.set()

    async def _main(self, weights: ModelWeights) -> None:
        with contextlib.ExitStack() as held:
            if self.identity is not None:
                held.enter_context(hold_identity(self.identity))  # one running node per identity
            await self._run(weights)

    async def _run(self, weights: ModelWeights) -> None:
        key_pair = create_new_key_pair() if self.identity is None else load_identity(self.identity)[0]
        with Ledger(self.ledger_path) as ledger:
            async with open_session(
                weights=weights,
                key_pair=key_pair,
                ledger=ledger,
                precision=self.precision,
                bootstrap=self.bootstrap,
                listen=[self.listen],
                config=self.config,
                min_providers=self.min_providers,
                keys=self.keys,
            ) as session:
                if self.prepare and not self._prepared:  # the weights were given: read them again
                    await trio.to_thread.run_sync(session.keys.prepare, session.all_directions())
                self._session, self._stop = session, trio.Event()
                self._token = trio.lowlevel.current_trio_token()
                self._ready.set()
                await self._stop.wait()

    def _submit(self, fn: Callable[[SwarmSession], Any], *, run_async: bool) -> Any:
        """Run `fn(session)` on the client's trio thread and wait for its result."""
        session, token, thread = self._session, self._token, self._thread
        if session is None or token is None or thread is None or not thread.is_alive():
            raise ClientClosedError("the client is not running; use it inside `with SwarmClient(...)`") from self._error
        try:
            if run_async:
                return trio.from_thread.run(fn, session, trio_token=token)
            return trio.from_thread.run_sync(fn, session, trio_token=token)
        except trio.RunFinishedError:
            raise ClientClosedError("the client stopped during the call") from self._error

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool = False) -> torch.Tensor:
        """Exact int64 `x_int @ W` (`transpose=False`) or `x_int @ W.T` (`transpose=True`), W being
        the quantization of the layer `layer_key` (its tensor or module name)."""
        return self._submit(lambda s: s.matmul(layer_key, x_int, transpose=transpose), run_async=True)

    def check_layers(self, digests: Mapping[str, bytes]) -> None:
        """Refuse to train unless every layer named in `digests` (layer or group key -> 32-byte
        quantization digest, the trainer's) is the layer the providers serve: ModelMismatchError
        names those that differ. With `prepare`, on a running client, the channels of exactly these
        keys are then opened (a group's sketched from its members, read again) and every other one
        closed, before training."""
        if self.weights is None:
            raise ClientClosedError("the client is not started")
        check_digests(self.weights, digests)
        if self.prepare and self._session is not None:
            directions = [(key, t) for key in digests for t in (False, True)]
            self._submit(lambda s: trio.to_thread.run_sync(s.keys.keep_only, directions), run_async=True)

    def state_bytes(self) -> dict[str, int]:
        """Bytes the client holds for the model's base layers: the layers' public summaries, and the
        secret sketches and keys of every open channel."""
        if self.weights is None:
            raise ClientClosedError("the client is not started")
        secrets = self._submit(lambda s: s.keys.state_bytes(), run_async=False)
        return {"summaries": self.weights.summary_bytes(), "secrets": secrets}

    def stats(self) -> ClientStats:
        """Bytes, chunks per provider, failures, bans, MACs and price paid so far, and the peer table."""
        return self._submit(SwarmSession.stats, run_async=False)

    def statistics(self) -> ClientStats:
        """The same as `stats()`, under the name the trainer's ExecutorStatistics.of looks for."""
        return self.stats()

    def close(self) -> None:
        """Stop the host thread; idempotent."""
        if self._thread is None:
            return
        if self._thread.is_alive() and self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        self._thread.join()
        self._thread, self._token, self._session = None, None, None
