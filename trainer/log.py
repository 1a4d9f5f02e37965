"""What a training run tells as it goes: the JSON-lines training log and the progress bar.

The log is one JSON object per line (``json.loads`` per line reads it back), each with ``time``
(Unix seconds) and ``event``: ``compile``, ``train``, ``step`` (a :class:`~.records.StepRecord`),
``checkpoint``, ``resume`` or ``saved_and_cleared``. It is appended to, never rewritten, so a run
resumed after a crash continues the same file.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from .records import StepRecord


def log_event(path: Path | None, entry: dict[str, Any]) -> None:
    """Append ``entry`` with the time to the training log at ``path`` (nothing when None)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps({"time": round(time.time(), 3), **entry}) + "\n")


def progress_bar(total: int | None, *, done: int, epoch: int, num_epochs: int, enabled: bool) -> tqdm:
    """The bar of one epoch of ``total`` micro-batches (None: unknown), ``done`` of them already consumed."""
    return tqdm(total=total, initial=done, desc=f"epoch {epoch + 1}/{num_epochs}", unit="batch", disable=not enabled,
                dynamic_ncols=True)


def show_step(bar: tqdm, record: StepRecord, bytes_sent: int) -> None:
    """Loss, tokens/s and the bytes this ``train`` call sent so far, on the bar."""
    bar.set_postfix(loss=f"{record.loss:.4f}", tok_s=f"{record.tokens / max(record.wall_s, 1e-9):.1f}",
                    sent=tqdm.format_sizeof(bytes_sent, "B", 1000), refresh=False)
