"""Entry point of the ``cipherswarm`` command: parses the subcommand and hands over to its module.

Only the module of the subcommand being run is imported (the others are listed from SUBCOMMANDS),
so ``cipherswarm --help`` stays instant and a provider never imports the trainer.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand -> (module under cipherswarm.cli, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("demo", "encrypt one layer's activations, multiply as a provider would, decrypt, verify; print the figures"),
    "provider": ("provider", "serve encrypted matmuls of a model's base layers to the swarm"),
    "identity": ("identity", "print this node's peer id, creating its key file if needed"),
    "status": ("status", "show the providers a client finds, their scores and bans"),
    "train": ("train", "fine-tune a model with LoRA as a client of a swarm (every base matmul encrypted)"),
    "testnet": ("testnet", "start a local swarm of providers and fine-tune the bundled model through it"),
    "convert": ("convert", "convert a GGUF model file into a checkpoint folder providers and clients can load"),
    "estimate": ("estimate", "predict a fine-tune's wall time, bottleneck and price on a swarm, by simulation"),
    "ledger": ("ledger", "earnings and spend from countersigned receipts; export them, or verify an export offline"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s module is imported to add its arguments."""
    parser = argparse.ArgumentParser(
        prog="cipherswarm",
        description="Private LoRA fine-tuning on other people's GPUs: every large matmul runs encrypted.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, formatter_class=argparse.RawDescriptionHelpFormatter)
        if name == command:
            mod = importlib.import_module(f"cipherswarm.cli.{module}")
            p.description = mod.__doc__
            mod.add_arguments(p)
            p.set_defaults(run=mod.run)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors whose message tells the user what to do: printed without a traceback."""
    from cipherswarm.fhe_backend.errors import FheError
    from cipherswarm.node.errors import NodeError
    from cipherswarm.node.identity import IdentityError
    from cipherswarm.node.weights import WeightsError
    from cipherswarm.protocol.errors import ProtocolError
    from cipherswarm.trainer.errors import TrainerError

    return (FheError, NodeError, IdentityError, WeightsError, ProtocolError, TrainerError, FileNotFoundError,
            PermissionError)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from cipherswarm.fhe_backend.allocator import retain_freed_memory

    retain_freed_memory()  # layer-sized buffers are reused instead of faulted in again per layer
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command if command in SUBCOMMANDS else None).parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if not isinstance(exc, _user_errors()):
            raise
        print(f"cipherswarm {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
