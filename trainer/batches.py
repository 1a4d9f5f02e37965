"""What a training batch is and the loss it is trained on: the shapes every loop here accepts
(:func:`split_batch`), the first batch of an inputset, the tensor a loss reads from a model's
output (:func:`model_output`), and the two losses built in: the causal-LM loss and, for sentence
encoders, the mean-pooled contrastive loss."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Label of positions that count for no loss (padding), as Hugging Face models use it."""


#: cosine similarities are multiplied by this before the contrastive softmax (sentence-transformers'
#: MultipleNegativesRankingLoss uses the same): similarities live in [-1, 1], too flat a softmax otherwise
CONTRASTIVE_SCALE = 20.0


def model_output(out: object) -> torch.Tensor:
    """The tensor a loss reads from what a model returned: the tensor itself, or of a Hugging Face
    ``ModelOutput`` (or tuple) its ``logits`` where it has them (language models, classifiers),
    else its ``last_hidden_state`` (bare encoders), else its first element."""
    if isinstance(out, torch.Tensor):
        return out
    for name in ("logits", "last_hidden_state"):
        value = getattr(out, name, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"the model returned {type(out).__name__} with neither logits nor last_hidden_state; "
                    "pass a loss_fn that reads it, or loss_fn=None for the model's own loss")


def batch_loss(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, labels: torch.Tensor,
               loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None) -> torch.Tensor:
    """The loss of one batch: ``loss_fn(model_output(model(ids, mask)), labels)``, or with
    ``loss_fn=None`` the model's own (``model(..., labels=labels).loss``)."""
    if loss_fn is None:
        loss = getattr(model(input_ids=ids, attention_mask=mask, labels=labels), "loss", None)
        if loss is None:
            raise ValueError("the model returned no loss; pass loss_fn=causal_lm_loss (or your own)")
        return loss
    return loss_fn(model_output(model(input_ids=ids, attention_mask=mask)), labels)


def mean_pool(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """One vector per row: the mean of ``hidden`` (rows, tokens, features) over the row's real
    tokens (labels other than ``ignore_index``), as sentence-transformers pools MiniLM and its kin."""
    weights = (labels != ignore_index).to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1)


def mean_pooled_contrastive_loss(hidden: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """The loss of a sentence-embedding model on pairs, with in-batch negatives.

    The batch holds 2B rows: B anchors, then their B positives in the same order; ``labels`` mark
    real tokens (anything but ``ignore_index``; padding: ``ignore_index``). Each row is mean-pooled
    (:func:`mean_pool`), and each anchor has to pick its own positive among all B by cosine
    similarity (times :data:`CONTRASTIVE_SCALE`, softmax, cross-entropy): sentence-transformers'
    MultipleNegativesRankingLoss, which all-MiniLM-L6-v2 was trained with. The other pairs'
    positives are the negatives, so larger batches make a harder task; no labels are needed
    beyond the pairing itself.
    """
    rows = hidden.shape[0]
    if rows % 2 or rows < 4:
        raise ValueError(f"a contrastive batch holds B anchors then B positives with B >= 2, got {rows} rows")
    pooled = F.normalize(mean_pool(hidden, labels, ignore_index), dim=-1)
    anchors, positives = pooled[: rows // 2], pooled[rows // 2 :]
    scores = anchors @ positives.T * CONTRASTIVE_SCALE
    return F.cross_entropy(scores, torch.arange(rows // 2, device=scores.device))


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


def loader_length(loader: object) -> int | None:
    """Micro-batches per epoch, when the loader knows (an iterable-style DataLoader may not)."""
    try:
        return len(loader)  # type: ignore[arg-type]
    except TypeError:
        return None
