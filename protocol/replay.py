"""Nonce freshness with bounded memory, shared fairly between signers.

A request is fresh if its expiry lies in (now, now + max_ttl_ms] and its nonce has not been accepted
before. A nonce only needs remembering until its frame expires, since an expired frame is refused
anyway; `max_ttl_ms` bounds how long that is and `capacity` bounds how many are remembered. When
the window is full of unexpired nonces it refuses new frames with Busy instead of forgetting a
nonce early, because forgetting one would let its frame be replayed: memory stays bounded and no
replay is ever accepted.

So that one signer cannot fill the window and lock everyone else out (BUSY for up to `max_ttl_ms`),
each scope (the signer's public key) holds at most `per_scope` live nonces and each group (the
provider passes the sender's network address) at most `per_group`: a signer or an address over its
share gets Busy, with the time until its own oldest nonce expires as the hint, and nobody else is
affected. Only `capacity / per_scope` signers together (from `capacity / per_group` addresses)
can fill the whole window, each of them with requests that passed every other cheap check.

The clock is a parameter (Unix time in ms), so tests and callers control it.
"""

from __future__ import annotations

import heapq

from .errors import Busy, ExpiredFrame, ReplayedFrame


DEFAULT_MAX_TTL_MS = 120_000
"""The longest request lifetime a provider accepts unless it says otherwise (README section 8; its
advert's `max_ttl_ms`)."""


def check_expiry(expires_at_ms: int, *, now_ms: int, max_ttl_ms: int) -> None:
    """Raise ExpiredFrame unless now_ms < expires_at_ms <= now_ms + max_ttl_ms."""
    not_after_ms = now_ms + max_ttl_ms
    if not now_ms < expires_at_ms <= not_after_ms:
        raise ExpiredFrame(expires_at_ms=expires_at_ms, now_ms=now_ms, not_after_ms=not_after_ms)


class ReplayWindow:
    """Remembers accepted nonces until their frames expire.

    Nonces are remembered per `scope` (verify_request passes the signer's public key), so one peer
    cannot use up another's nonces. Size `capacity` to at least the highest accepted request rate
    times `max_ttl_ms`, and `per_scope` to one honest signer's (a client signing 60 s requests can
    keep 4096 / 60 = 68 requests a second going to this receiver). `per_scope` and `per_group` are
    capped at `capacity`. Memory: a few hundred bytes per remembered nonce, at most `capacity` of them
    (65,536 by default: about 20 MB).
    """

    def __init__(
        self, *, capacity: int = 65_536, max_ttl_ms: int = DEFAULT_MAX_TTL_MS, per_scope: int = 4_096, per_group: int = 16_384
    ) -> None:
        if capacity <= 0 or per_scope <= 0 or per_group <= 0:
            raise ValueError("capacity, per_scope and per_group must be positive")
        if max_ttl_ms <= 0:
            raise ValueError("max_ttl_ms must be positive")
        self.capacity = capacity
        self.max_ttl_ms = max_ttl_ms
        self.per_scope = min(per_scope, capacity)
        self.per_group = min(per_group, capacity)
        self._expiry: dict[tuple[bytes, bytes], int] = {}  # (scope, nonce) -> expiry
        # the same, as a heap by expiry, each with its group (None: counted in no group)
        self._by_expiry: list[tuple[int, tuple[bytes, bytes], bytes | None]] = []
        self._scopes: dict[bytes, list[int]] = {}  # scope -> heap of its live nonces' expiries
        self._groups: dict[bytes, list[int]] = {}  # group -> the same

    def __len__(self) -> int:
        return len(self._expiry)

    def held(self, *, scope: bytes = b"", group: bytes | None = None) -> int:
        """Live nonces of `scope` (or, given `group`, of that group)."""
        return len(self._groups.get(group, ()) if group is not None else self._scopes.get(scope, ()))

    def check_and_record(
        self, nonce: bytes, *, expires_at_ms: int, now_ms: int, scope: bytes = b"", group: bytes | None = None
    ) -> None:
        """Accept `nonce` once per scope, until `expires_at_ms`; raise ExpiredFrame, ReplayedFrame or
        Busy (the scope's share, the group's share or the whole window is full). Nothing is recorded
        when it raises."""
        check_expiry(expires_at_ms, now_ms=now_ms, max_ttl_ms=self.max_ttl_ms)
        self._forget_expired(now_ms)
        key = (scope, nonce)
        if key in self._expiry:
            raise ReplayedFrame(nonce)
        mine = self._scopes.get(scope)
        if mine is not None and len(mine) >= self.per_scope:
            raise Busy(mine[0] - now_ms, "this key's share of the replay window is full")
        ours = None if group is None else self._groups.get(group)
        if ours is not None and len(ours) >= self.per_group:
            raise Busy(ours[0] - now_ms, "this address's share of the replay window is full")
        if len(self._expiry) >= self.capacity:
            raise Busy(self._by_expiry[0][0] - now_ms, "replay window full")
        self._expiry[key] = expires_at_ms
        heapq.heappush(self._by_expiry, (expires_at_ms, key, group))
        heapq.heappush(self._scopes.setdefault(scope, []), expires_at_ms)
        if group is not None:
            heapq.heappush(self._groups.setdefault(group, []), expires_at_ms)

    def _forget_expired(self, now_ms: int) -> None:
        while self._by_expiry and self._by_expiry[0][0] <= now_ms:
            _, key, group = heapq.heappop(self._by_expiry)
            del self._expiry[key]
            # The share's earliest expiry is at most this one's, so it has expired too: dropping it
            # keeps each share's size equal to its live nonces.
            self._drop_earliest(self._scopes, key[0])
            if group is not None:
                self._drop_earliest(self._groups, group)

    @staticmethod
    def _drop_earliest(shares: dict[bytes, list[int]], name: bytes) -> None:
        heap = shares[name]
        heapq.heappop(heap)
        if not heap:
            del shares[name]
