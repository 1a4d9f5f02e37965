"""What the node puts in a request's engine fields, and how a provider reads them back.

The protocol treats `backend` and `backend_params` as opaque; for the `rlwe` engine they are its
name and its `Params.to_tuple()` as little-endian u64 words, the same integers the ciphertext header
carries, so a provider can check the two agree before any work.
"""

from __future__ import annotations

import struct

from cipherswarm.fhe_backend import Params, ParameterError, get_backend
from cipherswarm.protocol import UnsupportedParams

BACKEND = "rlwe"
"""The one engine providers serve: exact secret-key RLWE (fhe_backend/README.md)."""
ENGINE = get_backend(BACKEND)


def encode_params(params: Params) -> bytes:
    values = params.to_tuple()
    return struct.pack(f"<{len(values)}Q", *values)


def decode_params(data: bytes) -> Params:
    """The parameters a request names; UnsupportedParams if they do not decode or are not valid."""
    if not data or len(data) % 8:
        raise UnsupportedParams(f"parameters must be u64 words, got {len(data)} bytes", backend=BACKEND)
    try:
        return Params.from_tuple(struct.unpack(f"<{len(data) // 8}Q", data))
    except ParameterError as exc:
        raise UnsupportedParams(str(exc), backend=BACKEND) from None
