"""The bit-width options every subcommand that quantizes shares: --forward-bits, --backward-bits and
--weight-bits, defaulting to ``Precision``'s defaults and refused by argparse when out of range."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cipherswarm.fhe_backend.quant import MAX_WEIGHT_BITS, MAX_X_BITS, MIN_WEIGHT_BITS, MIN_X_BITS, Precision


def bits_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: an int in [low, high], else a usage error."""
    def parse(text: str) -> int:
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value
    return parse


def add_weight_bits(p: argparse.ArgumentParser | argparse._ArgumentGroup, what: str) -> None:
    """--weight-bits; ``what`` says what the width decides for this subcommand."""
    default = Precision.weight_bits
    p.add_argument("--weight-bits", type=bits_in(MIN_WEIGHT_BITS, MAX_WEIGHT_BITS), default=default,
                   help=f"bits of the base weights ({MIN_WEIGHT_BITS}..{MAX_WEIGHT_BITS}, default {default}); {what}")


def add_precision_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--forward-bits, --backward-bits and --weight-bits."""
    for name, what in (("forward", "activations sent forward"), ("backward", "gradients sent backward")):
        default = getattr(Precision, f"{name}_bits")
        p.add_argument(f"--{name}-bits", type=bits_in(MIN_X_BITS, MAX_X_BITS), default=default,
                       help=f"bits of the {what} ({MIN_X_BITS}..{MAX_X_BITS}, default {default})")
    add_weight_bits(p, "the providers must serve the same (provider --weight-bits)")


def precision_of(args: argparse.Namespace) -> Precision:
    """The Precision of the parsed --forward-bits, --backward-bits and --weight-bits."""
    return Precision(args.forward_bits, args.backward_bits, args.weight_bits)
