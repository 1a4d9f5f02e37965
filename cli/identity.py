"""Print this node's peer id, creating its identity key file (mode 0600) if there is none yet.

The file holds the node's Ed25519 libp2p private key: its peer id, its Noise identity, and the key
that signs every reply, advert and receipt. Keep it private and keep it: a new key is a new peer
with no reputation.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", type=Path, default=None, help="key file (default: ~/.cipherswarm/identity.key)")
    p.add_argument("--no-create", action="store_true", help="fail instead of creating a missing key file")


def run(args: argparse.Namespace) -> int:
    from cipherswarm.node.identity import IdentityError, default_identity_path, load_identity, peer_id_of

    path = args.file or default_identity_path()
    try:
        key_pair, created = load_identity(path, create=not args.no_create)
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(peer_id_of(key_pair).to_base58())
    print(f"{'created' if created else 'read'} {path}", file=sys.stderr)
    return 0
