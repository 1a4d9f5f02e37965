"""Errors the node raises to its callers; each message says what to do next."""

from __future__ import annotations

import trio


class NodeError(Exception):
    """Base of the node's own errors."""


class NoProvidersError(NodeError):
    """No provider can take a chunk of this layer within the wait allowed."""

    def __init__(self, layer: str, *, known: int, reason: str) -> None:
        super().__init__(
            f"no provider for {layer!r}: {reason} ({known} known). Start one with "
            "`cipherswarm provider --model DIR`, or pass --bootstrap with a provider's multiaddr"
        )
        self.layer = layer
        self.known = known
        self.reason = reason


class ChunkFailedError(NodeError):
    """A chunk failed on every attempt allowed; `failures` lists them, oldest first."""

    def __init__(self, layer: str, failures: list[str]) -> None:
        super().__init__(
            f"a chunk of {layer!r} failed {len(failures)} times ({'; '.join(failures[-3:])}); "
            "check `cipherswarm status` for banned or busy providers"
        )
        self.layer = layer
        self.failures = failures


class ProvidersCheatingError(NodeError):
    """Providers kept returning wrong results after every key rotation allowed."""

    def __init__(self, layer: str, rotations: int) -> None:
        super().__init__(
            f"{layer!r}: wrong results after {rotations} key rotations; every cheater is banned, "
            "so retrying finds honest providers if any are left"
        )
        self.layer = layer
        self.rotations = rotations


class ClientClosedError(NodeError):
    """The client's host thread is not running (closed, or failed: the cause is chained)."""


def leaf_errors(group: BaseExceptionGroup) -> list[BaseException]:
    """The exceptions of a (nested) group that are not trio's own cancellations: what actually
    went wrong in a nursery whose failing child cancelled its siblings."""
    out: list[BaseException] = []
    for exc in group.exceptions:
        if isinstance(exc, BaseExceptionGroup):
            out.extend(leaf_errors(exc))
        elif not isinstance(exc, trio.Cancelled):
            out.append(exc)
    return out
