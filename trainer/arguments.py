"""``LoraTrainer``'s ``training_args``, as Concrete ML takes them: a dict, or an object with the same
attributes such as Hugging Face's ``TrainingArguments``, so that code written for either runs here.
Only what this loop honours is read; a dict naming anything else is refused, rather than ignored."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .remote import check_int

KNOWN = ("gradient_accumulation_steps", "max_grad_norm")


def read_training_args(args: object) -> tuple[int, float | None]:
    """(gradient_accumulation_steps, max_grad_norm) from a dict, an object such as HF TrainingArguments, or None."""
    if args is None:
        args = {}
    if isinstance(args, Mapping):
        unknown = sorted(set(args) - set(KNOWN))
        if unknown:
            raise ValueError(f"unknown training_args {unknown}; supported: {list(KNOWN)}")
        get = args.get
    else:
        def get(name: str, default: Any = None) -> Any:
            return getattr(args, name, default)
    steps, norm = get("gradient_accumulation_steps", 1), get("max_grad_norm", None)
    check_int("gradient_accumulation_steps", steps)
    if norm is not None and not (isinstance(norm, (int, float)) and norm > 0 and math.isfinite(norm)):
        raise ValueError(f"max_grad_norm must be a positive number or None, got {norm!r}")
    return steps, None if norm is None else float(norm)
