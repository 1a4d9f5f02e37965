"""The local SQLite ledger: receipts of accepted work, providers' track records, and bans.

A client records each chunk it accepted as the provider's receipt with its own countersignature;
a provider records the countersigned receipts clients send back. Either side can later prove what
was done and owed with nothing but these rows and the two peer ids (protocol README, "Receipts").
The request id is the primary key, so a chunk can never be recorded, and paid for, twice.
Balances (`tally`, `cipherswarm ledger`) are sums over these receipts with both signatures verified
again, never over the stored columns, which anyone with the file could have edited.

Bans for cheating are permanent, so they live here too and survive restarts, as does each
provider's measured record (successes, failures, latency, rate), which seeds the next session's
scores and is what `cipherswarm status` shows.

Durability: the file runs in WAL mode. Receipts and bans are written with synchronous=FULL: each is
on disk (the WAL fsynced) when the call returns, so a power loss cannot take back a receipt that was
countersigned or a ban that was decided. Track records are estimates refreshed all the time and
written with synchronous=NORMAL (no fsync; a power loss may roll the latest back, never corrupt
them). bench/ledger.py measures what the fsync costs per row.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from libp2p.peer.id import ID

from cipherswarm.protocol import BadSignature, SignedReceipt, UsageReceipt, verify_receipt
from cipherswarm.protocol.signing import peer_key

from .errors import NodeError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    request_id BLOB PRIMARY KEY,
    provider TEXT NOT NULL,
    client TEXT NOT NULL,
    layer TEXT NOT NULL,
    macs INTEGER NOT NULL,
    price_per_gmac INTEGER NOT NULL,
    amount INTEGER NOT NULL,
    completed_at_ms INTEGER NOT NULL,
    receipt BLOB NOT NULL,
    provider_signature BLOB NOT NULL,
    client_signature BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS bans (
    peer TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    banned_at_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS peers (
    peer TEXT PRIMARY KEY,
    successes INTEGER NOT NULL,
    failures INTEGER NOT NULL,
    latency_s REAL NOT NULL,
    rate REAL NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class TrackRecord:
    """A provider's measured record, as the client's peer table keeps it."""

    successes: int
    failures: int
    latency_s: float  # moving average of reply time minus compute time
    rate: float  # moving average of MAC/s of its computation


@dataclass(frozen=True, slots=True)
class Balance:
    """What one peer earned (role "provider") or spent (role "client") over the receipts tallied."""

    role: str
    peer: str
    receipts: int
    macs: int
    amount: int  # in the price's currency unit, as UsageReceipt.amount


@dataclass(frozen=True, slots=True)
class Rejected:
    """A receipt left out of a tally, and why."""

    request_id: bytes
    reason: str


@dataclass(frozen=True)
class Tally:
    """Balances over the receipts that verified, and the receipts that did not."""

    balances: list[Balance] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def total(self, role: str) -> int:
        """The sum of the amounts on one side: what the providers earned, or what the clients spent."""
        return sum(b.amount for b in self.balances if b.role == role)


def verify_countersigned(signed: SignedReceipt) -> UsageReceipt:
    """The receipt if both its provider's signature and its client's countersignature hold, under
    the keys its two peer ids embed: what a third party can check with nothing but the receipt.
    BadSignature otherwise (also for a receipt that was never countersigned)."""
    receipt = signed.receipt
    return verify_receipt(signed, provider_key=peer_key(receipt.provider), client_key=peer_key(receipt.client))


def tally(receipts: Iterable[SignedReceipt]) -> Tally:
    """Earnings per provider and spend per client over the countersigned receipts that verify.

    A receipt that fails verification, or repeats a request id already counted, is rejected with
    its reason instead of counted: a chunk is paid once, and only on both signatures."""
    sums: dict[tuple[str, str], list[int]] = {}
    rejected: list[Rejected] = []
    seen: set[bytes] = set()
    for signed in receipts:
        try:
            receipt = verify_countersigned(signed)
        except BadSignature as exc:
            rejected.append(Rejected(signed.receipt.request_id, str(exc)))
            continue
        if receipt.request_id in seen:
            rejected.append(Rejected(receipt.request_id, "duplicate request id: already counted"))
            continue
        seen.add(receipt.request_id)
        for role, peer in (("provider", receipt.provider), ("client", receipt.client)):
            row = sums.setdefault((role, ID(peer).to_base58()), [0, 0, 0])
            row[0] += 1
            row[1] += receipt.macs
            row[2] += receipt.amount
    balances = [Balance(role, peer, *row) for (role, peer), row in sorted(sums.items())]
    return Tally(balances, rejected)


class NotALedger(NodeError, ValueError):
    """A file opened read-only that is not a ledger (not SQLite, or without the receipts table)."""


class DuplicateReceipt(Exception):
    """A receipt for this request id is already recorded."""


class Ledger:
    """Receipts and permanent bans in one SQLite file (":memory:" for a throwaway one)."""

    def __init__(self, path: str | Path = ":memory:", *, read_only: bool = False) -> None:
        """``read_only``: open an existing ledger for queries only (SQLite ``mode=ro``), as an audit
        does while its node keeps writing: nothing is created, and any write fails."""
        if read_only:
            if not Path(path).is_file():
                raise FileNotFoundError(f"no ledger at {path}")
            self.path = str(path)
            self._db = sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, isolation_level=None)
            try:
                found = self._db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'receipts'").fetchone()
            except sqlite3.DatabaseError as exc:
                found, reason = None, str(exc)
            else:
                reason = "it has no receipts table"
            if found is None:
                self._db.close()
                raise NotALedger(f"{path} is not a ledger: {reason}")
            return
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        self.path = str(path)
        self._db = sqlite3.connect(self.path, isolation_level=None)  # autocommit: one transaction per row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # receipts and bans: on disk when written (module docstring)
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def record(self, signed: SignedReceipt, *, layer: str) -> None:
        """Store a countersigned receipt; DuplicateReceipt if its request is already recorded."""
        r = signed.receipt
        try:
            self._db.execute(
                "INSERT INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (r.request_id, ID(r.provider).to_base58(), ID(r.client).to_base58(), layer, r.macs, r.price_per_gmac, r.amount,
                 r.completed_at_ms, signed.receipt_bytes, signed.provider_signature, signed.client_signature),
            )
        except sqlite3.IntegrityError:
            raise DuplicateReceipt(r.request_id.hex()) from None

    def receipts(self) -> list[SignedReceipt]:
        rows = self._db.execute(
            "SELECT receipt, provider_signature, client_signature FROM receipts ORDER BY completed_at_ms, rowid"
        )
        return [SignedReceipt(receipt_bytes=r, provider_signature=p, client_signature=c) for r, p, c in rows]

    def total_amount(self) -> int:
        return int(self._db.execute("SELECT COALESCE(SUM(amount), 0) FROM receipts").fetchone()[0])

    def tally(self) -> Tally:
        """Balances from every recorded receipt, each signature verified again (module :func:`tally`):
        the stored columns are not trusted, so a row edited on disk, even one that no longer decodes,
        shows up as rejected instead of counted."""
        decoded, broken = [], []
        for request_id, data, provider_signature, client_signature in self._db.execute(
            "SELECT request_id, receipt, provider_signature, client_signature FROM receipts ORDER BY completed_at_ms, rowid"
        ):
            try:
                decoded.append(SignedReceipt(receipt_bytes=data, provider_signature=provider_signature,
                                             client_signature=client_signature))
            except (ValueError, TypeError) as exc:
                broken.append(Rejected(request_id, f"does not decode: {exc}"))
        result = tally(decoded)
        return Tally(result.balances, broken + result.rejected)

    def ban(self, peer: str, reason: str) -> None:
        self._db.execute(
            "INSERT OR REPLACE INTO bans VALUES (?, ?, ?)", (peer, reason, int(time.time() * 1000))
        )

    def unban(self, peer: str) -> bool:
        """Lift a permanent ban; False if the peer was not banned."""
        return self._db.execute("DELETE FROM bans WHERE peer = ?", (peer,)).rowcount > 0

    def bans(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT peer, reason FROM bans"))

    def save_record(self, peer: str, record: TrackRecord) -> None:
        """Store a provider's track record without waiting for the disk (module docstring)."""
        self._db.execute("PRAGMA synchronous=NORMAL")
        try:
            self._db.execute(
                "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?)",
                (peer, record.successes, record.failures, record.latency_s, record.rate),
            )
        finally:
            self._db.execute("PRAGMA synchronous=FULL")

    def synchronous(self) -> int:
        """SQLite's synchronous level in force for receipts and bans (2: FULL)."""
        return int(self._db.execute("PRAGMA synchronous").fetchone()[0])

    def records(self) -> dict[str, TrackRecord]:
        return {peer: TrackRecord(*rest) for peer, *rest in self._db.execute("SELECT * FROM peers")}
