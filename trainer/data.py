"""Fine-tuning data from files: plain text, or JSONL records of text, prompt/completion or chat.

``load_examples(path, tokenizer, seq_len)`` gives the training and held-out examples as batches
of ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` where no loss is taken):

- a folder with ``train.txt`` / ``train.jsonl`` and optionally ``valid.txt`` / ``valid.jsonl``;
  or a single ``.txt`` or ``.jsonl`` file. Without a validation file the last tenth of the examples
  (at least one) is held out.
- text (``.txt``, or JSONL records ``{"text": ...}``): the whole text as one token stream, cut into
  consecutive sequences of ``seq_len`` tokens; loss on every token.
- ``{"prompt": ..., "completion": ...}``: one example per record; loss on the completion only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: one example per record, rendered by the
  tokenizer's chat template; loss only on the assistant's turns. A turn's tokens are those between
  the rendering of the conversation before it (with the generation prompt) and the rendering up to
  and including it, so they are exactly what the model is asked to produce.

Examples shorter than ``seq_len`` are padded (mask 0, no loss); longer ones are refused with the
record's line and length, since cutting a completion would teach the model to stop mid-answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import TrainerError
from .batches import IGNORE_INDEX

HELD_OUT_FRACTION = 10  # without a validation file, one example in this many is held out


class DataError(TrainerError, ValueError):
    """The data cannot be used as given; the message names the file and line."""


Batch = dict[str, torch.Tensor]


def load_examples(path: str | Path, tokenizer: Any, seq_len: int) -> tuple[Batch, Batch]:
    """(training, held-out) examples of ``path`` (module docstring), each a batch of every example."""
    path = Path(path)
    if path.is_dir():
        train = _one_of(path, "train")
        if train is None:
            raise DataError(f"{path} has no train.txt or train.jsonl")
        valid = _one_of(path, "valid")
        if valid is not None:
            return _examples(train, tokenizer, seq_len), _examples(valid, tokenizer, seq_len)
        return _split(_examples(train, tokenizer, seq_len), train)
    if not path.is_file():
        raise DataError(f"{path} is neither a data folder nor a file")
    return _split(_examples(path, tokenizer, seq_len), path)


def _one_of(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{ext}" for ext in (".txt", ".jsonl") if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder} has both {found[0].name} and {found[1].name}: keep one")
    return found[0] if found else None


def _split(examples: Batch, path: Path) -> tuple[Batch, Batch]:
    count = len(examples["input_ids"])
    if count < 2:
        raise DataError(f"{path} gives {count} example(s): at least 2 are needed to hold one out for the loss")
    held = max(1, count // HELD_OUT_FRACTION)
    return {k: v[:-held] for k, v in examples.items()}, {k: v[-held:] for k, v in examples.items()}


def _examples(path: Path, tokenizer: Any, seq_len: int) -> Batch:
    if path.suffix == ".txt":
        return _text(path.read_text(encoding="utf-8"), tokenizer, seq_len, path)
    if path.suffix != ".jsonl":
        raise DataError(f"{path}: data files are .txt or .jsonl")
    records = _records(path)
    kinds = {_kind(r, path, line) for line, r in records}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes record kinds {sorted(kinds)}: use one per file")
    kind = kinds.pop()
    if kind == "text":
        eos = tokenizer.eos_token or ""
        return _text(eos.join(r["text"] for _, r in records), tokenizer, seq_len, path)
    rows = [_prompt_completion(r, tokenizer) if kind == "completion" else _chat(r, tokenizer, path, line)
            for line, r in records]
    return _padded(rows, tokenizer, seq_len, path, [line for line, _ in records])


def _records(path: Path) -> list[tuple[int, dict]]:
    records = []
    for line, text in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: each line must be a JSON object")
        records.append((line, record))
    if not records:
        raise DataError(f"{path} holds no records")
    return records


def _kind(record: dict, path: Path, line: int) -> str:
    if isinstance(record.get("messages"), list):
        return "chat"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return "completion"
    if isinstance(record.get("text"), str):
        return "text"
    raise DataError(f"{path}:{line}: a record needs \"text\", \"prompt\" and \"completion\", or \"messages\" "
                    f"(got keys {sorted(record)})")


def _text(text: str, tokenizer: Any, seq_len: int, path: Path) -> Batch:
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise DataError(f"{path} holds {len(ids)} tokens, fewer than one sequence of {seq_len}")
    seqs = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    return {"input_ids": seqs, "attention_mask": torch.ones_like(seqs), "labels": seqs.clone()}


def _prompt_completion(record: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt = tokenizer(record["prompt"], return_attention_mask=False)["input_ids"]
    full = tokenizer(record["prompt"] + record["completion"], return_attention_mask=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        full = full + [tokenizer.eos_token_id]  # the model learns to stop after the completion
    cut = _common_prefix(prompt, full)
    return full, [IGNORE_INDEX] * cut + full[cut:]


def _chat(record: dict, tokenizer: Any, path: Path, line: int) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{path}:{line}: chat records need a tokenizer with a chat template; this model's has none "
                        "(use prompt/completion records)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{path}:{line}: chat records need a fast tokenizer (token offsets tell the assistant's tokens "
                        "apart); this model has only a slow one (use prompt/completion records)")
    messages = record["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{path}:{line}: each message needs a \"role\" and a \"content\" string")
    text = _render(tokenizer, messages, generation_prompt=False)
    spans = []  # character spans of the assistant's turns in the rendered text
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], generation_prompt=False)
        if not text.startswith(upto):
            raise DataError(f"{path}:{line}: the chat template renders earlier turns differently once later ones follow; "
                            "the assistant's tokens cannot be told apart")
        spans.append((len(_render(tokenizer, messages[:i], generation_prompt=True)), len(upto)))
    if not spans:
        raise DataError(f"{path}:{line}: the conversation has no assistant turn to learn from")
    # the template writes any special tokens itself; offsets say which characters each token covers
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for t, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _render(tokenizer: Any, messages: list[dict], *, generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # the template's own error (a jinja exception, a role it refuses)
        raise DataError(f"the chat template refused the conversation: {exc}") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _padded(rows: list[tuple[list[int], list[int]]], tokenizer: Any, seq_len: int, path: Path, lines: list[int]) -> Batch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, ((row_ids, row_labels), line) in enumerate(zip(rows, lines)):
        if len(row_ids) > seq_len:
            raise DataError(f"{path}:{line}: {len(row_ids)} tokens, longer than --seq-len {seq_len}; raise it or shorten the record")
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_ids)] = torch.tensor(row_labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
