"""The options of how an optimizer step is made, shared by `train`, `testnet` and `estimate`:
--accumulation (micro-batches per step) and --in-flight (how many of them run at once)."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    """argparse type of counts: a usage error, not a traceback, for 0 or less."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_step_arguments(p: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--accumulation and --in-flight."""
    p.add_argument("--accumulation", type=positive_int, default=1, metavar="N",
                   help="gradient_accumulation_steps: micro-batches per optimizer step (the last step may have "
                        "fewer); the optimizer update waits for all of a step's micro-batches (default 1)")
    p.add_argument("--in-flight", type=positive_int, default=2, metavar="K",
                   help="micro-batches of one optimizer step run at once (LoraTrainer's micro_batches_in_flight): "
                        "one's uploads overlap another's compute and downloads, while the client's own torch work "
                        "runs for one at a time; the results are the same whatever K. Only micro-batches of one "
                        "step overlap: with --accumulation 1 nothing does. Memory: each micro-batch in flight "
                        "holds its own activations on the client (default 2)")
