"""Streams of peers that keep being refused are turned away before py-libp2p negotiates them.

Under a flood, a provider's event loop goes to streams it will refuse: profiled under
bench/provider_load.py's load (200 tricklers, 2,000 junk requests from 50 identities), 25% of its
loop's time was multistream-select negotiation, 14% reading their headers and most of the rest
the yamux and trio work around them, while the honest request's own transfer took under 1%. The
honest call waited for its turns of a loop kept busy by others.

So every refusal counts against its peer. A peer refused `strikes` times in a row with no request
served since is *struck*: it may open `rate` streams a second (in bursts of `burst`), and all
struck peers together `shared_rate`; any other stream of theirs is reset as it arrives, before
negotiation, which costs the loop a fraction of a refused request. A served request clears the
peer's strikes. A struck peer's first refusals were answered in full (BUSY with its retry hint,
or the error), so an honest client that follows its retry hints is rarely turned away, and one
that is sees a failed stream and retries as after a lost connection. Fresh identities start
unstruck, so a Sybil flood gets `strikes` answered streams per identity, and each identity costs
its sender a connection and a handshake first. At most `max_peers` peers are remembered (the
least recently refused forgotten first).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio
from libp2p.abc import IHost, INetStream
from libp2p.peer.id import ID


class TokenBucket:
    """`rate` tokens a second up to `burst`, starting full."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self._tokens, self._at = burst, now

    def ready(self, now: float) -> bool:
        self._tokens = min(self.burst, self._tokens + (now - self._at) * self.rate)
        self._at = now
        return self._tokens >= 1.0

    def take(self) -> None:
        self._tokens -= 1.0


class StreamGate:
    """The strikes of peers and their stream budgets (module docstring)."""

    def __init__(self, *, strikes: int = 3, rate: float = 1.0, burst: float = 4.0, shared_rate: float = 16.0,
                 max_peers: int = 4096, clock: Callable[[], float] = trio.current_time) -> None:
        if strikes < 1 or rate <= 0 or burst < 1 or shared_rate <= 0 or max_peers < 1:
            raise ValueError("strikes, burst and max_peers must be at least 1, the rates positive")
        self.strikes, self.rate, self.burst, self.max_peers = strikes, rate, burst, max_peers
        self.shared_rate = shared_rate
        self._clock = clock
        self._shared: TokenBucket | None = None  # made at the first struck stream: the clock may need a running loop
        self._strikes: OrderedDict[ID, int] = OrderedDict()
        self._buckets: dict[ID, TokenBucket] = {}
        self.turned_away = 0  # streams reset at the gate so far

    def refused(self, peer: ID) -> None:
        """One more refusal of `peer` in a row."""
        self._strikes[peer] = self._strikes.pop(peer, 0) + 1
        while len(self._strikes) > self.max_peers:
            oldest, _ = self._strikes.popitem(last=False)
            self._buckets.pop(oldest, None)

    def served(self, peer: ID) -> None:
        """`peer` got a result: its strikes are cleared."""
        self._strikes.pop(peer, None)
        self._buckets.pop(peer, None)

    def struck(self, peer: ID) -> bool:
        return self._strikes.get(peer, 0) >= self.strikes

    def admits(self, peer: ID) -> bool:
        """Whether a new stream of `peer` may go on to negotiation (taking a token if it is struck)."""
        if not self.struck(peer):
            return True
        now = self._clock()
        if self._shared is None:
            self._shared = TokenBucket(self.shared_rate, 2 * self.shared_rate, now)
        bucket = self._buckets.get(peer)
        if bucket is None:
            bucket = self._buckets[peer] = TokenBucket(self.rate, self.burst, now)
        if not (bucket.ready(now) and self._shared.ready(now)):
            return False
        bucket.take()
        self._shared.take()
        return True

    def install(self, host: IHost) -> None:
        """Put the gate in front of the host's handler of every inbound stream."""
        network: Any = host.get_network()  # a Swarm: its handler before negotiation is not in INetwork
        negotiate = network.common_stream_handler

        async def handle(stream: INetStream) -> None:
            if self.admits(stream.muxed_conn.peer_id):
                await negotiate(stream)
                return
            self.turned_away += 1
            await stream.reset()

        network.set_stream_handler(handle)
