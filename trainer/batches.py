"""What a training batch is and the loss it is trained on: the shapes every loop here accepts
(:func:`split_batch`), the first batch of an inputset, and the causal-LM loss."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of positions that count for no loss (padding), as Hugging Face models use it."""


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean next-token cross-entropy: logits at position t predict labels at t + 1."""
    shift_logits = logits[..., :-1, :].contiguous()  # batch, tokens - 1, vocab
    shift_labels = labels[..., 1:].contiguous()  # batch, tokens - 1
    return F.cross_entropy(shift_logits.view(-1, shift_logits.size(-1)), shift_labels.view(-1), ignore_index=ignore_index)


def split_batch(batch: object) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(input_ids, attention_mask, labels) from a batch.

    Accepted: a tensor of token ids; a mapping with ``input_ids`` and optionally ``attention_mask``
    and ``labels``; a tuple ``(input_ids, labels)`` or ``(input_ids, attention_mask, labels)``.
    Missing labels are the inputs themselves (causal LM), with padded positions ignored.
    """
    mask = labels = None
    if isinstance(batch, torch.Tensor):
        ids = batch
    elif isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError(f"a batch mapping needs 'input_ids', got keys {sorted(batch)}")
        ids, mask, labels = batch["input_ids"], batch.get("attention_mask"), batch.get("labels")
    elif isinstance(batch, (tuple, list)) and len(batch) in (2, 3):
        ids, *rest = batch
        mask, labels = (None, rest[0]) if len(rest) == 1 else rest
    else:
        raise TypeError("a batch must be a tensor of token ids, a mapping with 'input_ids', "
                        f"or a tuple (input_ids, labels) / (input_ids, attention_mask, labels); got {type(batch).__name__}")
    if not isinstance(ids, torch.Tensor) or ids.ndim != 2:
        shape = tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise ValueError(f"input_ids must be a 2-D tensor (batch, tokens), got {shape}; a loader yields batches, not rows")
    if mask is not None:
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {tuple(mask.shape)} differs from input_ids shape {tuple(ids.shape)}")
        binary = (mask == 0) | (mask == 1)
        if not bool(binary.all()):
            bad = torch.unique(mask[~binary])[:5].tolist()
            raise ValueError(f"attention_mask must hold only 0 and 1 (1 = real token), got values {bad}")
    if labels is None:
        labels = ids.clone()
        if mask is not None:
            labels[mask == 0] = IGNORE_INDEX
    return ids, mask, labels


def first_batch(inputset: object) -> object:
    """A tensor, mapping or tuple is one batch; any other iterable (a DataLoader) gives its first."""
    if isinstance(inputset, (torch.Tensor, Mapping, tuple)):
        return inputset
    try:
        return next(iter(inputset))  # type: ignore[call-overload]
    except (TypeError, StopIteration):
        raise ValueError("inputset must be a batch (tensor, mapping or tuple) or a non-empty iterable of batches") from None
