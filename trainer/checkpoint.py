"""Training checkpoints that resume at the saved step with the same losses.

A checkpoint folder ``<checkpoint_dir>/checkpoint-<step>`` holds the adapters (peft
``save_pretrained``, usable on their own) and ``trainer_state.pt``: step, epoch, micro-batches
consumed in that epoch, optimizer and scheduler state, the per-step records so far, and two RNG
snapshots - at the start of the epoch and at the checkpoint. Resuming replays the epoch's data
order from the first snapshot (the loader's shuffle is drawn when its iterator is created), skips
the consumed micro-batches, then restores the second. Everything is stored as plain tensors and
containers so that it loads with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
No key material is ever written here; a resumed run makes fresh keys in ``compile()``.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

STATE_FILE = "trainer_state.pt"
FORMAT = 1
_NAME = re.compile(r"^checkpoint-(\d+)$")


def _loader_generators(loader: object) -> list[torch.Generator]:
    """Generators a DataLoader draws its order from, besides the global one (deduplicated)."""
    found: list[torch.Generator] = []
    for owner in (loader, getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None)):
        gen = getattr(owner, "generator", None)
        if isinstance(gen, torch.Generator) and all(gen is not g for g in found):
            found.append(gen)
    return found


def capture_rng(loader: object) -> dict[str, Any]:
    """Every RNG state that training or the loader's order can depend on."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "loader": [g.get_state() for g in _loader_generators(loader)],
    }


def restore_rng(state: dict[str, Any], loader: object) -> None:
    """Put back the states of :func:`capture_rng` (the loader must be built the same way)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"]:
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    gens = _loader_generators(loader)
    if len(gens) != len(state["loader"]):
        raise ValueError("the loader does not have the generators it had when the checkpoint was saved")
    for gen, saved in zip(gens, state["loader"]):
        gen.set_state(saved)


def save_checkpoint(folder: Path, model: Any, state: dict[str, Any]) -> Path:
    """Write adapters and ``state`` to ``folder`` atomically (a half-written folder never looks valid)."""
    folder = Path(folder)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.save_pretrained(tmp)
    torch.save({"format": FORMAT, **state}, tmp / STATE_FILE)
    shutil.rmtree(folder, ignore_errors=True)
    os.replace(tmp, folder)
    return folder


def load_state(folder: Path) -> dict[str, Any]:
    """The trainer state of a checkpoint folder."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{folder} is not a checkpoint: {STATE_FILE} is missing")
    state = torch.load(path, weights_only=True)
    if state.get("format") != FORMAT:
        raise ValueError(f"checkpoint format {state.get('format')!r} is not {FORMAT}")
    return state


def latest_checkpoint(checkpoint_dir: Path) -> Path:
    """The complete checkpoint with the highest step in ``checkpoint_dir``."""
    found = []
    if Path(checkpoint_dir).is_dir():
        for child in Path(checkpoint_dir).iterdir():
            m = _NAME.match(child.name)
            if m and (child / STATE_FILE).is_file():
                found.append((int(m.group(1)), child))
    if not found:
        raise FileNotFoundError(f"no checkpoint-<step> folder with {STATE_FILE} in {checkpoint_dir}")
    return max(found)[1]


def checkpoint_folder(checkpoint_dir: Path, step: int) -> Path:
    """Where the checkpoint after ``step`` optimizer steps goes (zero-padded: folders sort by step)."""
    return Path(checkpoint_dir) / f"checkpoint-{step:06d}"
