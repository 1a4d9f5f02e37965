"""Balances from the ledger: only receipts with both signatures count, each verified again.

The first test runs a real provider and client (libp2p hosts on 127.0.0.1, real encryption), each
with its own ledger; the others check the tally's refusals on hand-signed receipts.
"""

from __future__ import annotations

import sqlite3
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import trio
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from cipherswarm.node import Ledger, ModelWeights
from cipherswarm.node.identity import signing_key
from cipherswarm.node.ledger import Balance, tally
from cipherswarm.protocol import UsageReceipt, countersign_receipt, sign_receipt
from cipherswarm.protocol.signing import peer_id

from node_factory import providers, random_operand, reference, session

LAYER = "model.layers.1.mlp.down_proj"  # 128 -> 64
GMAC = 10**9
TEST_S = 60


async def test_both_ledgers_balance_to_the_sum_of_the_countersigned_receipts(weights: ModelWeights) -> None:
    price = 3 * GMAC + 7  # not whole per MAC: each receipt rounds up on its own
    with trio.fail_after(TEST_S), Ledger() as client_book, Ledger() as provider_book:
        async with providers(weights, [dict(slots=1, price_per_gmac=price, ledger=provider_book)]) as (running,):
            async with session(weights, [running.addr], ledger=client_book, split="blocks") as client:
                n = client.keys.channel(client.weights.resolve(LAYER), transpose=False).params.n
                for _ in range(2):
                    x = random_operand(2 * n, 128)
                    assert torch.equal(await client.matmul(LAYER, x), reference(weights, LAYER, x, transpose=False))
                stats = client.stats()
                # the provider records a receipt once the countersignature reaches it, after the call returned
                while len(provider_book.receipts()) < len(client_book.receipts()):
                    await trio.sleep(0.05)
        receipts = [signed.receipt for signed in client_book.receipts()]
        assert len(receipts) >= 2  # a chunk of each call at least
        total = sum(-(-r.macs * price // GMAC) for r in receipts)
        macs = sum(r.macs for r in receipts)
        client_peer = ID({r.client for r in receipts}.pop()).to_base58()
        expected = [Balance("client", client_peer, len(receipts), macs, total),
                    Balance("provider", running.node.peer_id.to_base58(), len(receipts), macs, total)]
        for book in (client_book, provider_book):
            result = book.tally()
            assert result.balances == expected and result.rejected == []
            assert result.total("provider") == result.total("client") == total
        assert stats.paid == total > macs * price // GMAC  # rounded up per receipt, not over the sum


def _receipt(provider_key: object, client_key: object, macs: int, request: int) -> UsageReceipt:
    return UsageReceipt(
        provider=peer_id(provider_key.public_key()), client=peer_id(client_key.public_key()),
        request_id=request.to_bytes(16, "big"), request_digest=bytes(32), reply_digest=bytes(32), macs=macs,
        price_per_gmac=GMAC, completed_at_ms=1_700_000_000_000 + request,
    )


def test_a_receipt_without_both_valid_signatures_is_rejected_not_counted(tmp_path: Path) -> None:
    provider, client = signing_key(create_new_key_pair()), signing_key(create_new_key_pair())
    good = [countersign_receipt(sign_receipt(_receipt(provider, client, 100 * (i + 1), i), provider), client)
            for i in range(3)]
    unsigned = sign_receipt(_receipt(provider, client, 1000, 10), provider)  # never countersigned
    forged_body = replace(good[0], receipt_bytes=replace(good[0].receipt, macs=10**6, request_id=bytes(15) + b"\x0b").to_bytes())
    stranger = signing_key(create_new_key_pair())  # countersigned by a key that is not the receipt's client
    wrong_client = replace(unsigned, client_signature=countersign_receipt(
        sign_receipt(_receipt(provider, stranger, 1000, 10), provider), stranger).client_signature)
    result = tally([*good, unsigned, forged_body, wrong_client, good[1]])
    assert [b.amount for b in result.balances] == [600, 600]  # 100 + 200 + 300 MACs at 1 per MAC
    assert [b.receipts for b in result.balances] == [3, 3]
    reasons = [r.reason for r in result.rejected]
    assert len(reasons) == 4
    assert "not countersigned" in reasons[0]
    assert "does not verify" in reasons[1] and "does not verify" in reasons[2]
    assert "duplicate" in reasons[3]

    # A ledger's stored amount column is not what is counted: the signed bytes are.
    path = tmp_path / "ledger.sqlite"
    with Ledger(path) as book:
        for signed in good:
            book.record(signed, layer=LAYER)
    with sqlite3.connect(path) as db:
        db.execute("UPDATE receipts SET amount = amount * 1000")
        db.execute("UPDATE receipts SET receipt = ? WHERE amount = 100000", (forged_body.receipt_bytes,))
        db.execute("UPDATE receipts SET provider_signature = x'00' WHERE amount = 300000")  # no longer decodes
    with Ledger(path, read_only=True) as book:  # as `cipherswarm ledger` reads it
        assert book.total_amount() == 600_000  # the column, as edited
        result = book.tally()
        with pytest.raises(sqlite3.OperationalError, match="readonly"):
            book.ban("someone", "a read-only ledger takes no write")
    assert [b.amount for b in result.balances] == [200, 200]
    assert [r.request_id for r in result.rejected] == [good[2].receipt.request_id, forged_body.receipt.request_id]
    assert "does not decode" in result.rejected[0].reason and "does not verify" in result.rejected[1].reason
    with pytest.raises(FileNotFoundError):
        Ledger(tmp_path / "missing.sqlite", read_only=True)
    assert not (tmp_path / "missing.sqlite").exists()
