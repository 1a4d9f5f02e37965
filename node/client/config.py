"""The client's tunables; the defaults suit providers on a LAN or a good WAN link."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Split = Literal["auto", "blocks", "columns", "rows"]
Prefer = Literal["price", "speed", "balanced"]


@dataclass(frozen=True, kw_only=True)
class ClientConfig:
    split: Split = "auto"  # how a layer call is cut into chunks (router.py); "auto" picks per call
    max_chunks: int = 16  # most chunks one call is cut into
    # the most the user pays per 10^9 MACs: a request offers its provider's advertised price (never
    # more than this), providers advertising more are not used, and a receipt above the advert is refused
    max_price_per_gmac: int = 2**32
    # what a provider is chosen for (router.py, "Preference"): "speed" ignores price, "price" sends
    # chunks to the cheapest provider with a free slot, "balanced" weighs price against expected time
    prefer: Prefer = "balanced"
    price_weight_s: float = 0.0  # seconds a unit of price is worth when ranking providers, on top of `prefer`
    request_ttl_s: float = 60.0  # lifetime of a request (providers refuse more than 120 s)
    hedge_factor: float = 3.0  # hedge a chunk once it takes this many times its expected time ...
    hedge_min_s: float = 0.5  # ... but never before this
    timeout_factor: float = 20.0  # give up on an attempt after this many times its expected time ...
    timeout_min_s: float = 10.0  # ... but never before this
    max_attempts: int = 8  # attempts per chunk before the call fails
    # key rotations one provider identity may cause in a call (each after a wrong result of its). A
    # cheater is banned for good, so many identities cost a rotation each and never end the call
    max_rotations_per_peer: int = 1
    retry_base_s: float = 0.2  # backoff before asking a provider that already failed this chunk again
    retry_max_s: float = 5.0
    ban_base_s: float = 10.0  # first ban of a provider that timed out or was unreachable ...
    ban_max_s: float = 600.0  # ... doubling with each further one, up to this
    wait_providers_s: float = 30.0  # how long a chunk waits for any usable provider
    lookup_interval_s: float = 15.0  # DHT lookups for new providers
    read_timeout_s: float = 10.0  # one read call of a reply
    crypto_threads: int = 2  # worker threads for encryption, decryption and checks
    upload_slots: int = 4  # requests written at once, if together within upload_window_bytes (uploads.py) ...
    upload_window_bytes: int = 8 << 20  # ... bigger ones are written one at a time: company would only delay each
    uplink_bps: float = 0.0  # the client's uplink in bytes/s as stated by the user (0: unknown); lets big uploads
    # go side by side when one provider takes them slower than the link sends (uploads.py)
    link_bps: float = 2.5e6  # bytes/s a request's payload is assumed to move at until measured (20 Mbit/s)
    # shared-mask profile: bytes of key bindings (Z = W^T S, N integers per output column) kept
    # between calls, first come first kept; past it a layer's key is bound for each call from the
    # memory-mapped checkpoint (N token slots through the layer) and dropped after (client/keys.py)
    binding_budget: int = 2 << 30

    def __post_init__(self) -> None:
        if self.split not in ("auto", "blocks", "columns", "rows"):
            raise ValueError(f"split must be auto, blocks, columns or rows, got {self.split!r}")
        if self.prefer not in ("price", "speed", "balanced"):
            raise ValueError(f"prefer must be price, speed or balanced, got {self.prefer!r}")
        if not self.link_bps > 0:
            raise ValueError(f"link_bps must be > 0, got {self.link_bps}")
        if min(self.max_chunks, self.max_attempts, self.crypto_threads, self.upload_slots) < 1 or self.max_rotations_per_peer < 0:
            raise ValueError("max_chunks, max_attempts, crypto_threads and upload_slots must be >= 1, max_rotations_per_peer >= 0")
        if self.max_price_per_gmac < 0:
            raise ValueError(f"max_price_per_gmac must be >= 0, got {self.max_price_per_gmac}")
        if self.binding_budget < 0:
            raise ValueError(f"binding_budget must be >= 0, got {self.binding_budget}")
        if self.upload_window_bytes < 0 or self.uplink_bps < 0:
            raise ValueError(f"upload_window_bytes and uplink_bps must be >= 0, got {self.upload_window_bytes}, {self.uplink_bps}")
        if not 0 < self.request_ttl_s <= 120:
            raise ValueError("request_ttl_s must be in (0, 120]: providers refuse longer lifetimes")
