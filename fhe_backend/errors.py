"""Typed errors of the encryption engine.

Every failure a caller can act on has its own class, so callers branch on types and fields, never on
message strings. All derive from :class:`FheError`; the ones caused by bad input also derive from
``ValueError`` so generic input-validation handlers keep working.
"""

from __future__ import annotations


class FheError(Exception):
    """Base class of every error raised by :mod:`cipherswarm.fhe_backend`."""


class ParameterError(FheError, ValueError):
    """Parameters are insecure, inexact for the given weights and bit widths, or malformed."""


class InvalidCiphertext(FheError, ValueError):
    """Bytes or arrays that do not form a well-formed ciphertext (truncated, corrupted, wrong shape)."""


class KeyMismatch(InvalidCiphertext):
    """A ciphertext was made under another secret key than the one used to decrypt it.

    A ciphertext's key id is only a label: a forged label still decrypts to garbage, which the
    Freivalds verifier (:mod:`.verify`) catches.
    """


class ShapeMismatch(FheError, ValueError):
    """Operand shapes or dtypes do not fit together (e.g. activations vs. weight contraction)."""


class VerificationFailed(FheError):
    """A decrypted product failed its Freivalds check: the provider returned a wrong result."""

    def __init__(self, message: str, *, bad_rows: int = 0) -> None:
        super().__init__(message)
        self.bad_rows = bad_rows


class BackendUnavailable(FheError, ImportError):
    """A backend was requested whose optional dependency is not installed."""


class InputRangeError(FheError, ValueError):
    """Activations or weights hold values outside the range the parameters were chosen for."""
