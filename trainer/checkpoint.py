"""Training checkpoints that resume at the saved step with the same losses.

A checkpoint folder ``<checkpoint_dir>/checkpoint-<step>`` holds the adapters (peft
``save_pretrained``, usable on their own) and ``trainer_state.pt``: step, epoch, micro-batches
consumed in that epoch, optimizer and scheduler state, the per-step records so far, and two RNG
snapshots - at the start of the epoch and at the checkpoint. Resuming replays the epoch's data
order from the first snapshot (the loader's shuffle is drawn when its iterator is created), skips
the consumed micro-batches, then restores the second. Everything is stored as plain tensors and
containers so that it loads with ``torch.load(weights_only=True)``: a checkpoint is data, never code.
No key material is ever written here; a resumed run makes fresh keys in ``compile()``.

A checkpoint binds to the base weights it was trained against (``model_digest``: every remote
layer's quantization digest) and to ``gradient_accumulation_steps``, without which steps would not
line up; resuming with other ones is refused.

A fine-tune (:mod:`.finetune`) adds its run record, ``finetune.json`` (``RUN_FILE``), beside the
checkpoint folders: its config, mode and held-out loss before training, so that a resumed run shows
the same "before" figure and a folder is never resumed by, or mixed with, another config's run.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from peft.utils import set_peft_model_state_dict
from safetensors.torch import load_file

from .errors import ResumeError
from .log import log_event
from .records import StepRecord

STATE_FILE = "trainer_state.pt"
FORMAT = 1
RUN_FILE = "finetune.json"  # in a checkpoint folder: the config, mode and "before" loss of its run
_NAME = re.compile(r"^checkpoint-(\d+)$")


class _Digest(Protocol):
    def digest(self) -> str: ...


class Checkpointable(Protocol):
    """What a checkpoint is taken from and resumed into: the trainer's state (``LoraTrainer`` is one),
    named here so that this module needs nothing from the loop that calls it."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    gradient_accumulation_steps: int
    checkpoint_dir: Path | None
    train_log_path: Path | None

    @property
    def global_step(self) -> int: ...

    @property
    def step_records(self) -> tuple[StepRecord, ...]: ...

    @property
    def remote(self) -> _Digest: ...


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


@dataclass(kw_only=True)
class Position:
    """Where a ``train`` call stands in its data: what a checkpoint records besides weights and optimizer."""

    loader: Iterable
    epoch: int = 0
    done: int = 0  # micro-batches consumed in this epoch
    epoch_rng: dict | None = None  # RNG state at the start of this epoch (replays its data order)
    saved_at: tuple[int, int] | None = None  # (epoch, done) of the last checkpoint


def save(trainer: Checkpointable, at: Position) -> Path:
    """Checkpoint ``trainer`` after ``at.done`` micro-batches of ``at.epoch``, once per position: the
    folder of that position, written now or earlier."""
    folder = checkpoint_folder(trainer.checkpoint_dir, trainer.global_step)
    if at.saved_at == (at.epoch, at.done):
        return folder
    state = {
        "global_step": trainer.global_step, "epoch": at.epoch, "batches_done": at.done,
        "records": [asdict(r) for r in trainer.step_records],
        "optimizer": trainer.optimizer.state_dict(),
        "scheduler": None if trainer.lr_scheduler is None else trainer.lr_scheduler.state_dict(),
        "rng_epoch_start": at.epoch_rng, "rng_now": capture_rng(at.loader),
        "config": {"gradient_accumulation_steps": trainer.gradient_accumulation_steps},
        "model_digest": trainer.remote.digest(),
    }
    save_checkpoint(folder, trainer.model, state)
    at.saved_at = (at.epoch, at.done)
    log_event(trainer.train_log_path, {"event": "checkpoint", "step": trainer.global_step, "path": str(folder)})
    return folder


def resume(trainer: Checkpointable, where: str | Path | bool, at: Position) -> tuple[list[StepRecord], dict[str, Any]]:
    """Load a checkpoint (a folder, or True: the latest in ``trainer.checkpoint_dir``) into the
    trainer's model, optimizer and scheduler and into ``at``; return its step records and the RNG
    state at the checkpoint, for :func:`epoch_batches`."""
    if where is True:
        if trainer.checkpoint_dir is None:
            raise ValueError("resume_from_checkpoint=True needs checkpoint_dir")
        folder = latest_checkpoint(trainer.checkpoint_dir)
    else:
        folder = Path(where)  # type: ignore[arg-type]
    state = load_state(folder)
    saved_model = state.get("model_digest")
    if saved_model is not None and saved_model != trainer.remote.digest():
        raise ValueError(f"the checkpoint {folder} was trained against other base weights (its layers' quantization digests "
                         "differ from this model's): resume with the model it was trained on")
    saved_ga = state["config"]["gradient_accumulation_steps"]
    if saved_ga != trainer.gradient_accumulation_steps:
        raise ValueError(f"the checkpoint used gradient_accumulation_steps={saved_ga}, this trainer "
                         f"{trainer.gradient_accumulation_steps}: steps would not line up")
    loaded = set_peft_model_state_dict(trainer.model, load_file(folder / "adapter_model.safetensors"))
    if loaded.unexpected_keys:
        raise ValueError(f"the checkpoint's adapters do not fit this model: {loaded.unexpected_keys[:3]} ...")
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.lr_scheduler is not None and state["scheduler"] is not None:
        trainer.lr_scheduler.load_state_dict(state["scheduler"])
    records = [StepRecord(**r) for r in state["records"]]
    at.epoch, at.done, at.epoch_rng = state["epoch"], state["batches_done"], state["rng_epoch_start"]
    at.saved_at = (at.epoch, at.done)
    log_event(trainer.train_log_path, {"event": "resume", "step": len(records), "path": str(folder)})
    return records, state["rng_now"]


def epoch_batches(at: Position, rng_now: dict[str, Any] | None) -> Iterator:
    """The micro-batches of epoch ``at.epoch`` from ``at.done`` on. A fresh epoch first captures the
    RNG state its order is drawn from; a resumed one replays its order from that state, skips the
    consumed micro-batches, then puts back ``rng_now``, the state at the checkpoint."""
    if at.epoch_rng is None:
        at.epoch_rng = capture_rng(at.loader)
    else:
        restore_rng(at.epoch_rng, at.loader)
    batches = iter(at.loader)
    for _ in range(at.done):
        next(batches, None)
    if rng_now is not None:
        restore_rng(rng_now, at.loader)
    return batches


def latest_or_none(checkpoint_dir: Path) -> Path | None:
    """The checkpoint to resume from; None when the run stopped before its first one."""
    try:
        return latest_checkpoint(checkpoint_dir)
    except FileNotFoundError:
        return None


def steps_done(folder: Path | None) -> int:
    """Optimizer steps a checkpoint folder holds (0 for None: nothing to resume)."""
    return 0 if folder is None else int(load_state(folder)["global_step"])


def _run_record(config: Any, fhe: str) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: the config (a dataclass; its folders
    resolved) and the mode."""
    values = asdict(config)
    for name in ("model_dir", "data_dir"):
        values[name] = str(Path(values[name]).resolve())
    return {"config": json.loads(json.dumps(values)), "fhe": fhe}  # tuples as lists, as the file holds them


def _differences(saved: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """'name: saved -> wanted' for each config field or mode in which two run records differ."""
    pairs = {**{k: (saved["config"].get(k), v) for k, v in wanted["config"].items()}, "fhe": (saved["fhe"], wanted["fhe"])}
    return [f"{name}: {old!r} -> {new!r}" for name, (old, new) in pairs.items() if old != new]


def open_run(checkpoint_dir: Path, config: Any, fhe: str, *, resume: bool) -> float | None:
    """Check that ``checkpoint_dir`` fits the fine-tune of ``config`` in mode ``fhe``; the held-out
    loss before training when resuming.

    Resuming needs the folder's run record, with the same config and mode. Starting afresh needs a
    folder without one: the trainer resumes from the highest step, which could be an older run's.
    """
    path = Path(checkpoint_dir) / RUN_FILE
    if not resume:
        if path.exists() or latest_or_none(checkpoint_dir) is not None:
            raise ResumeError(f"{checkpoint_dir} holds the checkpoints of an earlier fine-tune: resume it "
                              "(resume=True; cipherswarm train --resume), or use another folder")
        return None
    if not path.is_file():
        raise ResumeError(f"nothing to resume in {checkpoint_dir}: it has no {RUN_FILE} (start without resuming)")
    saved = json.loads(path.read_text())
    changed = _differences(saved, _run_record(config, fhe))
    if changed:
        raise ResumeError(f"the checkpoints in {checkpoint_dir} are of another fine-tune ({'; '.join(changed)}): "
                          "resume with the same options, or use another folder")
    return float(saved["eval_before"])


def write_run(checkpoint_dir: Path, config: Any, fhe: str, eval_before: float) -> None:
    """Record the run before its first checkpoint, atomically (a torn file must not block resuming)."""
    Path(checkpoint_dir).mkdir(parents=True, exist_ok=True)
    path = Path(checkpoint_dir) / RUN_FILE
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({**_run_record(config, fhe), "eval_before": eval_before}, indent=2) + "\n")
    os.replace(tmp, path)
