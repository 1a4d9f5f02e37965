"""Who takes part: the client's CPU and link, the providers' devices, links, prices and failures.

Units are SI throughout: seconds, bytes per second, MAC per second. CPU work is in core-seconds:
a measured operation's process CPU time per value, and its parallelism (CPU time over wall time,
the cores one such job keeps busy). That way one figure serves a dedicated machine and a machine
shared by the client and the providers (the testnet), where every job draws on the same cores.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from cipherswarm.fhe_backend.int8_limbs import LIMB_BITS as INT8_LIMB_BITS
from cipherswarm.fhe_backend.params import PROFILES, SHARED_MASK
from cipherswarm.fhe_backend.ring import limb_count
from cipherswarm.protocol import DEFAULT_MAX_PAYLOAD_SIZE

MBIT = 1e6 / 8
"""Bytes per second in one Mbit/s."""

MESSAGE_OVERHEAD_BYTES = 1024
"""Assumed per message beyond the ciphertext words: frame header with signature, ciphertext header,
32-byte block seeds, receipt."""


@dataclass(frozen=True)
class ClientSpec:
    """The client machine. Crypto costs are CPU nanoseconds per value (core-ns): the defaults are
    twice bench/RESULTS.md's wall-clock figures on 2 cores (2048 x 4096 x 4096, 8-bit activations)."""

    cores: float = 8.0  # CPU cores
    encrypt_ns: float = 13.6  # per input value (padded token slots x features)
    decrypt_ns: float = 10.6  # per output value
    verify_ns: float = 1.0  # per output value (Freivalds)
    wire_ns_per_byte: float = 0.3  # serialising a ciphertext / parsing a result
    crypto_parallelism: float = 2.0  # cores one crypto job keeps busy (its thread pool)
    crypto_threads: int = 2  # crypto jobs at once (ClientConfig.crypto_threads)
    plain_macs_per_s: float = 2e11  # plaintext MAC/s of the model's client-side work, all its threads
    plain_parallelism: float = 8.0  # cores that plaintext work keeps busy
    call_overhead_s: float = 0.002  # per layer call: quantize, dequantize, thread hops (core-s)
    exchange_overhead_s: float = 0.004  # per attempt: sign, stream, check, receipt, ledger (core-s)
    up_bps: float = 50 * MBIT  # uplink, bytes/s
    down_bps: float = 300 * MBIT  # downlink, bytes/s


@dataclass(frozen=True)
class ProviderSpec:
    """One provider: its device, link, price, and how it fails."""

    macs_per_s: float  # encrypted MAC/s of one product alone (what its benchmark measures)
    parallelism: float = 1.0  # cores (or devices) one product keeps busy
    price_per_gmac: float = 10.0  # per GMAC as receipts count them (padded tokens x d_in x d_out)
    up_bps: float = 50 * MBIT
    down_bps: float = 300 * MBIT
    rtt_s: float = 0.04  # round trip to the client
    slots: int = 2  # products computed at once
    max_payload: int = DEFAULT_MAX_PAYLOAD_SIZE
    layers: tuple[str, ...] = ()  # globs over module names it holds; empty: all
    fail_prob: float = 0.0  # chance an attempt is silently lost (the client times out)
    cheats: bool = False  # every result it returns is wrong (the client's check fails: ban, key rotation)
    mean_up_s: float = math.inf  # churn: mean time between departures (exponential)
    mean_down_s: float = 600.0  # churn: mean time away once gone (exponential)


@dataclass(frozen=True)
class Swarm:
    """The client, the providers and how they are wired.

    ``shared_cores``: when set, the client and every provider run on one machine of that many
    cores (the testnet): all their CPU work shares it, and transfers are loopback, costing
    ``loopback_s_per_byte`` core-seconds per byte (Noise and yamux on both ends) instead of link time.
    """

    client: ClientSpec
    providers: tuple[ProviderSpec, ...]
    shared_cores: float | None = None
    loopback_s_per_byte: float = 0.0
    seed: int = 0

    @classmethod
    def uniform(cls, count: int, provider: ProviderSpec, client: ClientSpec, **kw: Any) -> "Swarm":
        return cls(client=client, providers=(provider,) * count, **kw)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Swarm":
        client = ClientSpec(**data.get("client", {}))
        providers = tuple(ProviderSpec(**{**p, "layers": tuple(p.get("layers", ()))}) for p in data["providers"])
        rest = {f.name: data[f.name] for f in fields(cls) if f.name in data and f.name not in ("client", "providers")}
        return cls(client=client, providers=providers, **rest)

    def with_client(self, **changes: Any) -> "Swarm":
        return replace(self, client=replace(self.client, **changes))


@dataclass(frozen=True)
class GpuAssumption:
    """How a consumer GPU's encrypted MAC/s follows from its int8 tensor-core peak (not measured here).

    A product multiplies each ciphertext matrix by W as int8 limb GEMMs: ``ceil(log_q / 8)`` limbs
    per matrix, two matrices (A and B) in the default and compact profiles, one (B) with the shared mask. The
    encrypted rate is the int8 MAC peak times an achieved fraction over the limb GEMMs per product.
    """

    name: str = "RTX 4070-class"
    int8_tops_dense: float = 233.0  # int8 tensor-core peak, dense, tera-ops/s (2 ops per MAC)
    efficiency: float = 0.5  # fraction of the peak the limb GEMMs achieve
    log_q: int = 46  # ciphertext modulus bits of a 4096-wide LLaMA layer (bench/RESULTS.md)
    usd_per_hour: float = 0.20  # what renting such a GPU costs, for the price per GMAC

    def limb_gemms(self, profile: str) -> int:
        return (1 if PROFILES[profile] & SHARED_MASK else 2) * limb_count(self.log_q, INT8_LIMB_BITS)

    def macs_per_s(self, profile: str) -> float:
        return self.int8_tops_dense * 1e12 / 2 * self.efficiency / self.limb_gemms(profile)

    def price_per_gmac(self, profile: str) -> float:
        """USD per GMAC at full use: the hourly price over the GMACs it computes in an hour."""
        return self.usd_per_hour / (self.macs_per_s(profile) * 3600 / 1e9)
