"""Errors of the trainer that a caller can act on; each says what to do next.

Bad arguments raise plain ``ValueError``/``TypeError`` with a one-line constraint; the classes here
mark the states and model shapes that need a different call, and carry the facts as fields.
"""

from __future__ import annotations

from pathlib import Path


class TrainerError(Exception):
    """Base class of the trainer's own errors."""


class NotCompiledError(TrainerError, RuntimeError):
    """Encrypted training was asked for before ``compile()`` (or after its keys were cleared)."""


class NoLoraLayersError(TrainerError, ValueError):
    """The model has no LoRA adapter, so there is nothing to train on the client."""


class BackpropSkipError(TrainerError, ValueError):
    """``n_layers_to_skip_for_backprop`` would drop a gradient that a LoRA weight needs."""

    def __init__(self, message: str, *, layer: str, max_skip: int) -> None:
        super().__init__(message)
        self.layer = layer  # the first skipped layer whose input depends on trainable weights
        self.max_skip = max_skip  # the largest value that drops no needed gradient


class TrainingStopped(TrainerError):
    """Training was stopped between optimizer steps by the caller's ``stop_when`` (a spending limit,
    say), not by a failure: ``checkpoint`` (taken at ``step``; None without a ``checkpoint_dir``) is
    what a resumed run continues from."""

    def __init__(self, reason: str, *, step: int, checkpoint: "Path | None") -> None:
        super().__init__(reason)
        self.reason, self.step, self.checkpoint = reason, step, checkpoint


class ResumeError(TrainerError, ValueError):
    """A checkpoint folder that does not fit the asked run: resuming would mix two fine-tunes, or
    starting afresh would mix its checkpoints with an earlier run's."""
