"""Records shared by the node's provider and client sides: adverts, chunks and statistics."""

from __future__ import annotations

from dataclasses import dataclass, field

from libp2p.peer.id import ID
from multiaddr import Multiaddr

from cipherswarm.protocol import DEFAULT_MAX_TTL_MS, GROUP_PROTOCOL_ID, CapabilityAdvert, Range, Verified, WeightSlice


@dataclass(frozen=True, slots=True)
class ProviderAdvert:
    """A provider's verified offer, in the node's own types."""

    peer: ID  # the advert's signer: the provider
    addrs: tuple[Multiaddr, ...]  # transport addresses to dial
    models: frozenset[bytes]  # model content hashes
    layers: frozenset[bytes] | None  # layer digests held; None: every layer of every model
    backends: tuple[str, ...]
    protocols: tuple[str, ...]
    device: str
    macs_per_second: int  # the provider's own benchmark
    price_per_gmac: int
    free_slots: int
    max_payload_size: int
    issued_at_ms: int
    expires_at_ms: int
    # what one request may ask of it (protocol README, section 8); 0: not stated (an older provider)
    max_reply_size: int = 0  # reply payload bytes
    max_output_elements: int = 0  # result elements computed (ring blocks x n x width)
    min_contraction: int = 0  # fewest contraction features per request, unless the layer has fewer
    max_ttl_ms: int = 0  # longest request lifetime
    max_unacked: int = 0  # requests it gives one client before their receipts are countersigned; 0: not stated

    @classmethod
    def from_verified(cls, verified: Verified[CapabilityAdvert]) -> ProviderAdvert:
        """Raises ValueError if an address does not decode."""
        a = verified.message
        return cls(
            peer=ID(verified.signer),
            addrs=tuple(Multiaddr(addr) for addr in a.addrs),
            models=frozenset(a.models),
            layers=frozenset(a.layers) or None,
            backends=a.backends,
            protocols=a.protocols,
            device=a.device,
            macs_per_second=a.macs_per_second,
            price_per_gmac=a.price_per_gmac,
            free_slots=a.free_slots,
            max_payload_size=a.max_payload_size,
            issued_at_ms=a.issued_at_ms,
            expires_at_ms=a.expires_at_ms,
            max_reply_size=a.max_reply_size,
            max_output_elements=a.max_output_elements,
            min_contraction=a.min_contraction,
            max_ttl_ms=a.max_ttl_ms,
            max_unacked=a.max_unacked,
        )

    def accepts_ttl(self, ttl_ms: int) -> bool:
        """Whether it takes requests living `ttl_ms`; one that does not state its limit is assumed
        to take the protocol's default of 120 s."""
        return ttl_ms <= (self.max_ttl_ms or DEFAULT_MAX_TTL_MS)

    def holds(self, model_hash: bytes, layer_digests: tuple[bytes, ...]) -> bool:
        """Whether it serves every one of the layers; more than one (a group: one request
        concatenates them) needs protocol 1.1 as well."""
        held = self.layers
        return (model_hash in self.models and (held is None or all(d in held for d in layer_digests))
                and (len(layer_digests) == 1 or GROUP_PROTOCOL_ID in self.protocols))


@dataclass(frozen=True, slots=True)
class Chunk:
    """One piece of a layer call: token blocks x contraction range x output range.

    Ranges are over the operand's axes, whatever the direction: `contraction` indexes the features
    of x (rows of W forward, columns of W for the transposed product), `output` the result's
    columns. Every split of fhe-scheme.md is one of these; `row_parts` is how many contraction
    pieces the plan cut, which the ciphertext's output modulus must allow for.
    """

    index: int
    blocks: Range  # ring blocks of N tokens
    contraction: Range
    output: Range
    row_parts: int = 1

    def tokens(self, n: int, total: int) -> Range:
        """The token rows this chunk covers, given N tokens per block and `total` tokens."""
        return Range(self.blocks.start * n, min(total, self.blocks.stop * n))

    def weight_slice(self, transpose: bool) -> WeightSlice:
        """The slice of W (d_in x d_out) the provider multiplies by."""
        if transpose:
            return WeightSlice(rows=self.output, cols=self.contraction)
        return WeightSlice(rows=self.contraction, cols=self.output)


@dataclass(frozen=True, slots=True)
class PeerView:
    """One row of the client's peer table, as `status` and `stats()` show it."""

    peer: str
    addrs: tuple[str, ...]
    device: str
    layers: int | None  # layers held; None: all
    macs_per_second: int  # advertised
    measured_macs_per_second: float  # end to end, including the network
    latency_s: float
    price_per_gmac: int
    free_slots: int
    reputation: float  # (successes + 1) / (successes + failures + 2)
    failures: int
    chunks: int
    banned: str  # "" or why, with the remaining time of a temporary ban
    relayed: bool = False  # reached through a relay: it advertises only relayed addresses (behind NAT,
    # node/nat) and no direct connection to it stands (none was hole punched)


@dataclass(frozen=True, slots=True)
class ClientStats:
    """Cumulative figures of a client since it started; `stats()` returns a fresh one each time."""

    calls: int = 0
    chunks: int = 0  # accepted (verified) chunks
    bytes_sent: int = 0
    bytes_received: int = 0
    macs: int = 0
    paid: int = 0  # sum of the receipts' amounts, in the price's currency unit
    retries: int = 0
    hedges: int = 0
    timeouts: int = 0
    busy: int = 0  # BUSY replies received
    verification_failures: int = 0
    key_rotations: int = 0
    chunks_by_peer: dict[str, int] = field(default_factory=dict)
    failures_by_peer: dict[str, int] = field(default_factory=dict)
    bans: dict[str, str] = field(default_factory=dict)  # peer -> reason
    peers: tuple[PeerView, ...] = ()
    # the client's CPU seconds in its crypto worker threads and the crypto pool's work for them
    # (what the trainer's per-step split reads)
    encrypt_s: float = 0.0
    decrypt_s: float = 0.0
    verify_s: float = 0.0
    wire_s: float = 0.0  # serialising ciphertexts and parsing results
    hash_s: float = 0.0  # SHA-256 of request and reply payloads
    # the trio thread's CPU seconds by part (node/cpu.py): noise (ChaCha20-Poly1305), streams
    # (yamux, framing, sockets), signatures (ed25519), ledger (SQLite), discovery (gossip, DHT),
    # client_tasks (routing, dispatching, bookkeeping), trio_scheduler (trio's own loop)
    trio_cpu: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class ProviderStats:
    """Cumulative figures of a provider since it started."""

    requests: int = 0  # streams opened to it
    served: int = 0  # OK replies
    busy: int = 0  # BUSY replies
    errors: int = 0  # other error replies
    acks: int = 0  # countersigned receipts received
    macs: int = 0
    earned: int = 0  # sum of the amounts of the receipts it issued
    in_flight: int = 0  # requests admitted now (being read, queued or computed)
    peak_in_flight: int = 0  # most requests admitted at once: bounds its memory
