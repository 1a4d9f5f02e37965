"""Balances from countersigned receipts: what each provider earned and each client spent, with
export of the receipts and their offline verification by anyone.

    cipherswarm ledger                                        # the client's ledger (~/.cipherswarm/client.sqlite)
    cipherswarm ledger --ledger provider.sqlite --format csv  # a provider's earnings, per client too
    cipherswarm ledger export receipts.json                   # every receipt, verifiable without this node
    cipherswarm ledger verify receipts.json                   # anyone: exit 0 only if every receipt holds

A balance counts only receipts that carry the provider's signature and the client's countersignature,
both verified again here against the public keys the two peer ids embed (Ed25519 peer ids hold their
key): the ledger's stored amounts are not trusted. A receipt that fails is listed and left out.
Amounts are in the unit providers price in (`cipherswarm provider --price`, per 10^9 MACs), rounded
up per receipt: the unit of `cipherswarm train --max-price/--budget`.

An export (JSON, or CSV when the file ends in .csv or --format csv) holds per receipt the exact signed
bytes, both signatures and both public keys (hex), and the receipt's fields decoded for reading.
`verify` checks each signature over the signed bytes, that each key is its peer id's, and that the
decoded fields are those signed; it exits 1 and lists the receipts that fail, 0 if all hold.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cipherswarm.node.ledger import Tally
    from cipherswarm.protocol import SignedReceipt

EXPORT_FORMAT = "cipherswarm-receipts/1"
#: receipt fields as decoded for reading; `verify` checks each against the signed bytes
FIELDS = ("request_id", "provider", "client", "macs", "price_per_gmac", "amount", "completed_at_ms")
#: what the signatures are checked with
SIGNED = ("receipt", "provider_signature", "client_signature", "provider_public_key", "client_public_key")
INVALID = 1  # `verify` found a receipt that does not hold
USAGE = 2  # as argparse exits on a bad command line


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", nargs="?", choices=("balances", "export", "verify"), default="balances",
                   help="balances (default): earned per provider, spent per client; export FILE: write the receipts "
                        "with everything needed to verify them; verify FILE: check an exported file offline")
    p.add_argument("file", nargs="?", type=Path, help="export: the file to write ('-': stdout); verify: the file to check")
    p.add_argument("--ledger", type=Path, default=None,
                   help="SQLite ledger to read: a client's (default ~/.cipherswarm/client.sqlite) or a provider's "
                        "(its --ledger); never modified")
    p.add_argument("--format", choices=("table", "csv", "json"), default=None,
                   help="balances: table (default), csv or json; export: json (default) or csv (default csv for a .csv file)")


def run(args: argparse.Namespace) -> int:
    if args.action == "verify":
        if args.file is None:
            return _usage("verify: give the exported FILE to check")
        return _verify(args.file)
    ledger = _ledger_path(args.ledger)
    if args.action == "export":
        if args.file is None:
            return _usage("export: give the FILE to write ('-' for stdout)")
        if args.format == "table":
            return _usage("export: --format is json or csv")
        return _export(ledger, args.file, args.format)
    if args.file is not None:
        return _usage(f"unexpected argument {args.file} (did you mean `export` or `verify`?)")
    return _balances(ledger, args.format or "table")


def _usage(message: str) -> int:
    print(f"cipherswarm ledger {message}", file=sys.stderr)
    return USAGE


def _ledger_path(path: Path | None) -> Path:
    """The ledger to read: the one given, or the client's default (as `cipherswarm train` writes it)."""
    from cipherswarm.node.identity import home_dir

    return path or home_dir() / "client.sqlite"


# -- balances ---------------------------------------------------------------------------------------


def _balances(path: Path, fmt: str) -> int:
    from cipherswarm.node.ledger import Ledger

    with Ledger(path, read_only=True) as ledger:  # a missing file is an error, not a new ledger; the node may be writing it
        result = ledger.tally()
    rows = [{"role": b.role, "peer": b.peer, "receipts": b.receipts, "macs": b.macs, "amount": b.amount}
            for b in result.balances]
    rejected = [{"request_id": r.request_id.hex(), "reason": r.reason} for r in result.rejected]
    if fmt == "json":
        print(json.dumps({"ledger": str(path), "balances": rows, "earned": result.total("provider"),
                          "spent": result.total("client"), "rejected": rejected}, indent=2))
    elif fmt == "csv":
        out = csv.DictWriter(sys.stdout, fieldnames=["role", "peer", "receipts", "macs", "amount"], lineterminator="\n")
        out.writeheader()
        out.writerows(rows)
    else:
        print(_table(path, result))
    if fmt != "json":
        for r in rejected:
            print(f"rejected receipt {r['request_id']}: {r['reason']} (not counted)", file=sys.stderr)
    return 0


def _table(path: Path, result: Tally) -> str:
    lines = [f"{path}: {sum(b.receipts for b in result.balances if b.role == 'provider')} countersigned receipt(s) verified, "
             f"{len(result.rejected)} rejected"]
    for role, verb in (("provider", "earned"), ("client", "spent")):
        mine = [b for b in result.balances if b.role == role]
        if not mine:
            continue
        lines.append(f"{verb} by {role}:")
        width = max(len(b.peer) for b in mine)
        lines += [f"  {b.peer.ljust(width)}  {b.amount:>14,}  ({b.receipts:,} receipts, {b.macs:,} MACs)" for b in mine]
        lines.append(f"  {'total'.ljust(width)}  {result.total(role):>14,}")
    return "\n".join(lines)


# -- export and verify ------------------------------------------------------------------------------


def _exported(signed: SignedReceipt) -> dict[str, Any]:
    """One receipt as exported: decoded fields for reading, then what the signatures are checked with."""
    from libp2p.peer.id import ID  # the receipt names peers by their multihash bytes

    r = signed.receipt
    provider, client = ID(r.provider), ID(r.client)
    keys = [peer.extract_public_key() for peer in (provider, client)]
    return {
        "request_id": r.request_id.hex(), "provider": provider.to_base58(), "client": client.to_base58(),
        "macs": r.macs, "price_per_gmac": r.price_per_gmac, "amount": r.amount, "completed_at_ms": r.completed_at_ms,
        "receipt": signed.receipt_bytes.hex(), "provider_signature": signed.provider_signature.hex(),
        "client_signature": signed.client_signature.hex(),
        "provider_public_key": "" if keys[0] is None else keys[0].serialize().hex(),
        "client_public_key": "" if keys[1] is None else keys[1].serialize().hex(),
    }


def _export(path: Path, file: Path, fmt: str | None) -> int:
    fmt = fmt or ("csv" if file.suffix.lower() == ".csv" else "json")
    from cipherswarm.node.ledger import Ledger

    with Ledger(path, read_only=True) as ledger:
        try:
            rows = [_exported(s) for s in ledger.receipts()]
        except ValueError as exc:
            print(f"{path} holds a receipt that does not decode ({exc}): `cipherswarm ledger` lists it", file=sys.stderr)
            return INVALID
    if fmt == "json":
        text = json.dumps({"format": EXPORT_FORMAT, "receipts": rows}, indent=1) + "\n"
    else:
        buffer = io.StringIO()
        out = csv.DictWriter(buffer, fieldnames=[*FIELDS, *SIGNED], lineterminator="\n")
        out.writeheader()
        out.writerows(rows)
        text = buffer.getvalue()
    if str(file) == "-":
        sys.stdout.write(text)
    else:
        tmp = file.with_name(file.name + ".tmp")  # a crash leaves the old file or the whole new one
        tmp.write_text(text)
        tmp.replace(file)
        print(f"wrote {len(rows)} receipt(s) to {file}", file=sys.stderr)
    return 0


def _read_export(file: Path) -> list[dict[str, str]]:
    """The receipts of an exported file, JSON or CSV (told apart by content, not by name)."""
    text = sys.stdin.read() if str(file) == "-" else file.read_text()
    if text.lstrip().startswith("{"):
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != EXPORT_FORMAT:
            raise ValueError(f"{file} is not a {EXPORT_FORMAT} export")
        return [{k: str(v) for k, v in row.items()} for row in data["receipts"]]
    return list(csv.DictReader(io.StringIO(text)))


def _parse(row: dict[str, str]) -> SignedReceipt:
    """The signed receipt of an exported row; ValueError if it is malformed, or if the row's decoded
    fields or public keys are not those signed (a reader of the file would be misled by them)."""
    from cipherswarm.protocol import SignedReceipt

    try:
        signed = SignedReceipt(receipt_bytes=bytes.fromhex(row["receipt"]),
                               provider_signature=bytes.fromhex(row["provider_signature"]),
                               client_signature=bytes.fromhex(row["client_signature"]))
    except KeyError as exc:
        raise ValueError(f"missing column {exc}") from None
    except TypeError as exc:
        raise ValueError(str(exc)) from None
    signed_fields = _exported(signed)
    for name in (*FIELDS, "provider_public_key", "client_public_key"):
        if name in row and str(row[name]) != str(signed_fields[name]):
            raise ValueError(f"{name} {row[name]} is not the signed {signed_fields[name]}")
    return signed


def _verify(file: Path) -> int:
    from cipherswarm.node.ledger import tally

    try:
        rows = _read_export(file)
    except (ValueError, KeyError, csv.Error) as exc:  # json.JSONDecodeError is a ValueError
        print(f"{file} is not a receipts export: {exc}")
        return INVALID
    parsed, failures = [], []
    for i, row in enumerate(rows, 1):
        try:
            parsed.append(_parse(row))
        except ValueError as exc:
            failures.append(f"receipt {i} ({row.get('request_id', '?')}): {exc}")
    result = tally(parsed)  # both signatures, and each request counted once
    failures += [f"receipt {r.request_id.hex()}: {r.reason}" for r in result.rejected]
    for line in failures:
        print(line)
    print(f"{len(rows) - len(failures)} of {len(rows)} receipt(s) verified, {len(failures)} failed; "
          f"amount verified {result.total('client'):,}")
    return INVALID if failures else 0
