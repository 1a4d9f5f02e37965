"""The local SQLite ledger: receipts of accepted work, providers' track records, and bans.

A client records each chunk it accepted as the provider's receipt with its own countersignature;
a provider records the countersigned receipts clients send back. Either side can later prove what
was done and owed with nothing but these rows and the two peer ids (protocol README, "Receipts").
The request id is the primary key, so a chunk can never be recorded, and paid for, twice.

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
from dataclasses import dataclass
from pathlib import Path

from cipherswarm.protocol import SignedReceipt

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


class DuplicateReceipt(Exception):
    """A receipt for this request id is already recorded."""


class Ledger:
    """Receipts and permanent bans in one SQLite file (":memory:" for a throwaway one)."""

    def __init__(self, path: str | Path = ":memory:") -> None:
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
                (r.request_id, str(r.provider), str(r.client), layer, r.macs, r.price_per_gmac, r.amount,
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
