"""The ``cipherswarm`` command line: one program for providers, clients and the local testnet."""

from .main import main

__all__ = ["main"]
