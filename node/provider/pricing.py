"""A provider's asked price per GMAC: fixed, or moving within a range with how loaded it is.

Rule. The price is `low + (high - low) * x`, rounded to a whole unit, with x in [0, 1]:

- x rises at 1/ramp_s per second while the provider is *saturated*, load >= SATURATED (every
  compute slot taken, requests queueing, or a client at its unacknowledged credit: service.py),
- falls at the same rate while it is *idle*, load < IDLE (less than half its slots in use),
- and holds in between.

So a provider that stays full climbs from `low` to `high` in `ramp_s` seconds and one that stays
idle comes back down as fast; demand, not a schedule, sets where it sits. The load is piecewise
constant between `observe` calls (the service reports every admission and release), so x is
integrated exactly. `low == high` is a fixed price.

Honouring. A client chooses a provider by its advert and offers that advert's price; adverts are
re-sent every advert interval, so a client may act on a price a little older than the current one.
A request is accepted if it offers at least `floor()`: the lowest price this provider advertised
within the last `honour_s` seconds (two advert intervals: the advert it replaced, and the time for
a request to be sent) or its current price, if lower. Whatever it accepted, it charges `charge()`:
the client's offer, or the current price if that is lower, so a receipt never exceeds what the
client agreed to. A price advertised longer ago than `honour_s` is refused (PAYMENT, with the
current price), as is any offer below `low`.

The clock is injected (trio's by default), so the rule is tested on a hand-driven clock.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable

import trio

#: load at or above which the price rises: every compute slot is in use (or a client's credit is)
SATURATED = 1.0
#: load below which the price falls: less than half of the compute slots in use
IDLE = 0.5
#: seconds of saturation that take the price from its lowest to its highest (and of idleness back)
RAMP_S = 60.0
#: distinct advertised prices remembered for `floor`; dropping older ones only makes it stricter
MAX_ADVERTISED = 64


class Pricing:
    """The asked price between `low` and `high` (module docstring); `start` is where it begins."""

    def __init__(self, *, low: int, high: int, start: int | None = None, ramp_s: float = RAMP_S, honour_s: float,
                 clock: Callable[[], float] = trio.current_time) -> None:
        start = low if start is None else start
        if not 0 <= low <= start <= high:
            raise ValueError(f"prices must satisfy 0 <= low <= start <= high, got {low}, {start}, {high}")
        if not ramp_s > 0 or honour_s < 0:
            raise ValueError("ramp_s must be positive and honour_s not negative")
        self.low = low
        self.high = high
        self.ramp_s = ramp_s
        self.honour_s = honour_s
        self._clock = clock
        self._x = 0.0 if high == low else (start - low) / (high - low)
        self._load = 0.0
        self._since: float | None = None  # when x was last brought up to date (None: never)
        self._advertised: deque[tuple[int, float]] = deque(maxlen=MAX_ADVERTISED)  # (price, last advertised at)

    @property
    def dynamic(self) -> bool:
        return self.high > self.low

    def _advance(self) -> float:
        """Bring x up to now under the load held since the last call; the time now."""
        now = self._clock()
        if self._since is not None and self.dynamic:
            trend = 1.0 if self._load >= SATURATED else -1.0 if self._load < IDLE else 0.0
            self._x = min(1.0, max(0.0, self._x + trend * (now - self._since) / self.ramp_s))
        self._since = now
        return now

    def observe(self, load: float) -> None:
        """From now on the provider is at `load` (admitted requests per compute slot, or a client's
        share of its credit, whichever is larger)."""
        if not load >= 0 or math.isinf(load):
            raise ValueError(f"load must be finite and >= 0, got {load}")
        self._advance()
        self._load = load

    def current(self) -> int:
        """The price asked now."""
        self._advance()
        return round(self.low + (self.high - self.low) * self._x)

    def advertise(self) -> int:
        """The price asked now, remembered as advertised (an advert is being built with it)."""
        price, now = self.current(), self._clock()
        if self._advertised and self._advertised[-1][0] == price:
            self._advertised.pop()
        self._advertised.append((price, now))
        return price

    def floor(self) -> int:
        """The least a request may offer now: the lowest price advertised within `honour_s`, or the
        current price if that is lower."""
        price, now = self.current(), self._clock()
        while self._advertised and self._advertised[0][1] < now - self.honour_s:
            self._advertised.popleft()
        return min([price, *(p for p, _ in self._advertised)])

    def charge(self, offered: int) -> int:
        """What the receipt of an accepted request charges per GMAC: its offer, or the current price if lower."""
        return min(offered, self.current())
