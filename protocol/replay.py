"""Nonce freshness with bounded memory.

A request is fresh if its expiry lies in (now, now + max_ttl_ms] and its nonce has not been accepted
before. A nonce only needs remembering until its frame expires, since an expired frame is refused
anyway; `max_ttl_ms` bounds how long that is and `capacity` bounds how many are remembered. When
the window is full of unexpired nonces it refuses new frames with Busy instead of forgetting a
nonce early, because forgetting one would let its frame be replayed: memory stays bounded and no
replay is ever accepted.

The clock is a parameter (Unix time in ms), so tests and callers control it.
"""

from __future__ import annotations

import heapq

from .errors import Busy, ExpiredFrame, ReplayedFrame


def check_expiry(expires_at_ms: int, *, now_ms: int, max_ttl_ms: int) -> None:
    """Raise ExpiredFrame unless now_ms < expires_at_ms <= now_ms + max_ttl_ms."""
    not_after_ms = now_ms + max_ttl_ms
    if not now_ms < expires_at_ms <= not_after_ms:
        raise ExpiredFrame(expires_at_ms=expires_at_ms, now_ms=now_ms, not_after_ms=not_after_ms)


class ReplayWindow:
    """Remembers accepted nonces until their frames expire.

    Nonces are remembered per `scope` (verify_request passes the signer's public key), so one peer
    cannot use up another's nonces. Size `capacity` to at least the highest accepted
    request rate times `max_ttl_ms`.
    """

    def __init__(self, *, capacity: int = 65_536, max_ttl_ms: int = 120_000) -> None:
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        if max_ttl_ms <= 0:
            raise ValueError("max_ttl_ms must be positive")
        self.capacity = capacity
        self.max_ttl_ms = max_ttl_ms
        self._expiry: dict[tuple[bytes, bytes], int] = {}  # (scope, nonce) -> expiry
        self._by_expiry: list[tuple[int, tuple[bytes, bytes]]] = []  # the same, as a heap by expiry

    def __len__(self) -> int:
        return len(self._expiry)

    def check_and_record(self, nonce: bytes, *, expires_at_ms: int, now_ms: int, scope: bytes = b"") -> None:
        """Accept `nonce` once per scope, until `expires_at_ms`; raise ExpiredFrame, ReplayedFrame or
        Busy."""
        check_expiry(expires_at_ms, now_ms=now_ms, max_ttl_ms=self.max_ttl_ms)
        self._forget_expired(now_ms)
        key = (scope, nonce)
        if key in self._expiry:
            raise ReplayedFrame(nonce)
        if len(self._expiry) >= self.capacity:
            raise Busy(self._by_expiry[0][0] - now_ms, "replay window full")
        self._expiry[key] = expires_at_ms
        heapq.heappush(self._by_expiry, (expires_at_ms, key))

    def _forget_expired(self, now_ms: int) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now_ms:
            _, key = heapq.heappop(self._by_expiry)
            del self._expiry[key]
