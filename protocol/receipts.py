"""Usage receipts: issued by the provider, countersigned by the client, checked by anyone.

A receipt is signed as the exact bytes of a UsageReceipt under two domains (README, "Receipts"):
the provider's signature says "I did this work for this client at this price"; the client's
countersignature, given only after its own check of the result passed, says "and I accept it".
The marketplace's accounting needs nothing but the receipt and the two public keys (an Ed25519 peer
id embeds its key, so the two peer ids in the receipt are enough to find them).
"""

from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .errors import BadSignature
from .messages import SignedReceipt, UsageReceipt
from .signing import RECEIPT_CLIENT_DOMAIN, RECEIPT_PROVIDER_DOMAIN, peer_id, require_peer, sign, verify


def sign_receipt(receipt: UsageReceipt, key: Ed25519PrivateKey) -> SignedReceipt:
    """The provider's signature over `receipt`; `key` must be the identity of `receipt.provider`."""
    if peer_id(key.public_key()) != receipt.provider:
        raise ValueError("key must belong to the receipt's provider")
    data = receipt.to_bytes()
    return SignedReceipt(receipt_bytes=data, provider_signature=sign(key, RECEIPT_PROVIDER_DOMAIN, data))


def countersign_receipt(signed: SignedReceipt, key: Ed25519PrivateKey) -> SignedReceipt:
    """The client's acceptance of a receipt; `key` must be the identity of the receipt's client.
    Countersign only after the result has passed verification: it is what the provider is paid on."""
    if peer_id(key.public_key()) != signed.receipt.client:
        raise ValueError("key must belong to the receipt's client")
    client_signature = sign(key, RECEIPT_CLIENT_DOMAIN, signed.receipt_bytes)
    return dataclasses.replace(signed, client_signature=client_signature)


def verify_receipt(
    signed: SignedReceipt,
    *,
    provider_key: Ed25519PublicKey,
    client_key: Ed25519PublicKey | None = None,
) -> UsageReceipt:
    """The receipt, if the provider's signature holds and, with `client_key`, the client's
    countersignature holds too (a receipt without one is then refused). BadSignature otherwise."""
    receipt = signed.receipt
    require_peer(provider_key, receipt.provider)
    verify(provider_key, RECEIPT_PROVIDER_DOMAIN, signed.receipt_bytes, signed.provider_signature)
    if client_key is not None:
        verify_countersignature(signed, client_key)
    return receipt


def verify_countersignature(signed: SignedReceipt, client_key: Ed25519PublicKey) -> None:
    """Raise BadSignature unless the receipt is countersigned by its client, holding `client_key`."""
    require_peer(client_key, signed.receipt.client)
    if not signed.client_signature:
        raise BadSignature("receipt is not countersigned")
    verify(client_key, RECEIPT_CLIENT_DOMAIN, signed.receipt_bytes, signed.client_signature)
