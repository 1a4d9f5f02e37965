"""The options every subcommand that quantizes and encrypts shares: --forward-bits, --backward-bits
and --weight-bits, defaulting to ``Precision``'s defaults and refused by argparse when out of range;
and --profile, the encryption profile."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cipherswarm.fhe_backend.params import PROFILES
from cipherswarm.fhe_backend.quant import MAX_WEIGHT_BITS, MAX_X_BITS, MIN_WEIGHT_BITS, MIN_X_BITS, Precision
from cipherswarm.node.client.config import ClientConfig
from cipherswarm.node.client.keys import DEFAULT_PROFILE


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


PROFILE_HELP = {
    "default": "exact products; about 7 B per value sent and 8-11 B returned; no key binding",
    "compact": "about 30%% fewer bytes each way; products carry noise below the activations' own rounding "
               "error, checked within its bound (bench/RESULTS.md: top-1 99.2%% against 99.6%% on SmolLM2-135M)",
    "shared-mask": "exact; uploads rounded to fewer bits (about 6.5 B per value sent), replies carry no mask product "
                   "(4-5 B returned, and a short micro-batch pays only for its tokens) and providers do half the "
                   "work; each key is bound to its layer (N tokens through the layer, per key), the bindings held "
                   "in client memory up to --binding-budget-mb",
    "compact-shared-mask": "compact's approximate products and fewer bytes sent, with shared-mask's replies: the "
                           "fewest bytes each way",
}


def add_profile_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup, choices: tuple[str, ...] = tuple(PROFILES)) -> None:
    """--profile, among ``choices`` (what this subcommand can run)."""
    p.add_argument("--profile", choices=choices, default=DEFAULT_PROFILE,
                   help=f"encryption profile (default: {DEFAULT_PROFILE}): " + "; ".join(f"{c}: {PROFILE_HELP[c]}" for c in choices))


def add_binding_budget_argument(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--binding-budget-mb: ClientConfig.binding_budget (train, testnet and estimate)."""
    default = ClientConfig().binding_budget >> 20
    p.add_argument("--binding-budget-mb", type=int, default=default, metavar="MB",
                   help="--profile shared-mask: MB of key bindings kept in memory (N integers per output column "
                        "of a layer); past it a layer's key is bound again for each call from the checkpoint "
                        f"(N tokens through the layer) (default {default})")
