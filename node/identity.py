"""A node's persistent identity: one Ed25519 key pair in a file only its owner can read.

The key is the libp2p identity (the peer id is its hash), the Noise static identity, and the key
every frame, advert and receipt is signed with, so losing it loses the node's reputation and
leaking it lets anyone impersonate the node. The file holds libp2p's `PrivateKey` protobuf (the
same bytes go-libp2p and js-libp2p store), is created with mode 0600, and is refused, as ssh
refuses keys, when group or others may read it.

One identity is one node: two nodes with one peer id would be one peer to everyone else (the DHT,
gossipsub and `status` show one of them, and their adverts overwrite each other). A running node
therefore holds its identity (`hold_identity`: an exclusive lock on `<file>.lock` that the kernel
drops when the process ends, however it ends), and a second node given the same file is refused
with the holder's pid and the fix.

The protocol signs with `cryptography`'s Ed25519 and names peers by their multihash bytes; libp2p
holds the same key as its own type. `signing_key` converts the one into the other (the same RFC
8032 seed, so the same public key and peer id) at this boundary, so the protocol needs no libp2p.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ed25519
from libp2p.crypto.ed25519 import Ed25519PrivateKey, create_new_key_pair
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key
from libp2p.peer.id import ID

ENV_HOME = "CIPHERSWARM_HOME"
"""Directory of a node's files (identity, ledger); default ~/.cipherswarm."""


class IdentityError(Exception):
    """The identity file cannot be used; the message says how to fix it."""


def home_dir() -> Path:
    return Path(os.environ.get(ENV_HOME) or Path.home() / ".cipherswarm")


def default_identity_path() -> Path:
    return home_dir() / "identity.key"


def peer_id_of(key_pair: KeyPair) -> ID:
    return ID.from_pubkey(key_pair.public_key)


def signing_key(key_pair: KeyPair) -> ed25519.Ed25519PrivateKey:
    """The identity's key as the protocol signs with it. TypeError for a key other than Ed25519,
    which no frame may be signed with (protocol README, "Signatures")."""
    private_key = key_pair.private_key
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"a {private_key.get_type().name} identity cannot sign frames: Ed25519 only")
    return ed25519.Ed25519PrivateKey.from_private_bytes(private_key.to_bytes())  # PyNaCl keeps the 32-byte seed


def load_identity(path: Path, *, create: bool = True) -> tuple[KeyPair, bool]:
    """The key pair stored at `path` and whether it was just created (only if `create`)."""
    try:
        return _read(path), False
    except FileNotFoundError:
        if not create:
            raise IdentityError(f"no identity at {path}; run `cipherswarm identity --file {path}` to create one") from None
    key_pair = create_new_key_pair()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two nodes started at once must not each write a key and then use different ones.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return _read(path), False
    with os.fdopen(fd, "wb") as f:
        f.write(key_pair.private_key.serialize())
    return key_pair, True


@contextmanager
def hold_identity(path: Path) -> Iterator[None]:
    """Hold the identity at `path` while the block runs; IdentityError if another process holds it."""
    lock = path.with_name(path.name + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            raise IdentityError(f"{path} is the identity of another running node (pid {holder}): one identity is one "
                                "peer, so give this node its own with --identity FILE") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        os.close(fd)  # closing drops the lock


def _read(path: Path) -> KeyPair:
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise IdentityError(f"{path} is accessible by others (mode {stat.S_IMODE(mode):o}); run `chmod 600 {path}`")
    try:
        private_key = deserialize_private_key(path.read_bytes())
    except Exception as exc:  # any parse failure means the same thing to the user
        raise IdentityError(f"{path} is not a libp2p private key: {exc}") from None
    if not isinstance(private_key, Ed25519PrivateKey):
        raise IdentityError(f"{path} holds a {private_key.get_type().name} key; cipherswarm signs with Ed25519 only")
    return KeyPair(private_key, private_key.get_public_key())
