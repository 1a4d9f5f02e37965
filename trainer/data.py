"""Fine-tuning data from files: plain text, or records of text, prompt/completion, chat or sentence pairs.

``load_examples(path, tokenizer, seq_len)`` gives the training and held-out examples as batches
of ``input_ids``, ``attention_mask`` and ``labels`` (``IGNORE_INDEX`` where no loss is taken):

- where the data is: a ``.txt``, ``.jsonl`` or ``.parquet`` file; a folder saved by
  ``datasets``' ``save_to_disk`` (a ``Dataset``, or a ``DatasetDict`` with a ``train`` split and
  optionally ``validation``/``valid``/``test``); or a folder with ``train.txt`` / ``train.jsonl`` /
  ``train.parquet`` and optionally ``valid.*``. Without a validation split the last tenth of the
  examples (at least one; two pairs) is held out. JSONL lines, Parquet rows and dataset rows are records alike.
- text (``.txt``, or records ``{"text": ...}``): the whole text as one token stream, cut into
  consecutive sequences of ``seq_len`` tokens; loss on every token.
- ``{"prompt": ..., "completion": ...}``: one example per record; loss on the completion only.
- ``{"messages": [{"role": ..., "content": ...}, ...]}``: one example per record, rendered by the
  tokenizer's chat template; loss only on the assistant's turns. A turn's tokens are those between
  the rendering of the conversation before it (with the generation prompt) and the rendering up to
  and including it, so they are exactly what the model is asked to produce.
- ``{"anchor": ..., "positive": ...}`` (with ``pairs=True``, for a sentence encoder): one example
  per record, two rows of shape ``(2, seq_len)``: the anchor and the text it should embed close to
  (:func:`~.batches.mean_pooled_contrastive_loss`); labels mark the real tokens.

Examples shorter than ``seq_len`` are padded (mask 0, no loss); longer ones are refused with the
record's place and length, since cutting a completion would teach the model to stop mid-answer.
Empty files, bytes that are not UTF-8, unreadable tables and records of unknown keys are refused too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .errors import TrainerError
from .batches import IGNORE_INDEX

HELD_OUT_FRACTION = 10  # without a validation split, one example in this many is held out
SUFFIXES = (".txt", ".jsonl", ".parquet")
VALID_SPLITS = ("validation", "valid", "test")  # of a saved DatasetDict, the first one present is held out


class DataError(TrainerError, ValueError):
    """The data cannot be used as given; the message names the file and line (or row)."""


Batch = dict[str, torch.Tensor]
Record = tuple[str, dict]  # (where it is, for messages: "file:line" or "file row N"; the record)


def load_examples(path: str | Path, tokenizer: Any, seq_len: int, *, pairs: bool = False) -> tuple[Batch, Batch]:
    """(training, held-out) examples of ``path`` (module docstring), each a batch of every example.
    ``pairs``: the model is a sentence encoder, trained on anchor/positive records only."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return _saved_dataset(path, tokenizer, seq_len, pairs)
        train = _one_of(path, "train")
        if train is None:
            raise DataError(f"{path} has no train{'/'.join(SUFFIXES)} and is not a folder saved by datasets' save_to_disk")
        valid = _one_of(path, "valid")
        if valid is not None:
            return _examples(train, tokenizer, seq_len, pairs), _examples(valid, tokenizer, seq_len, pairs)
        return _split(_examples(train, tokenizer, seq_len, pairs), train, pairs)
    if not path.is_file():
        raise DataError(f"{path} is neither a data folder nor a file")
    return _split(_examples(path, tokenizer, seq_len, pairs), path, pairs)


def _one_of(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{ext}" for ext in SUFFIXES if (folder / f"{stem}{ext}").is_file()]
    if len(found) > 1:
        raise DataError(f"{folder} has both {found[0].name} and {found[1].name}: keep one")
    return found[0] if found else None


def _split(examples: Batch, path: Path, pairs: bool) -> tuple[Batch, Batch]:
    count = len(examples["input_ids"])
    least = 2 if pairs else 1  # a contrastive loss needs another pair to tell its own from
    if count < least + 1:
        raise DataError(f"{path} gives {count} example(s): at least {least + 1} are needed to hold {least} out for the loss")
    held = max(least, count // HELD_OUT_FRACTION)
    return {k: v[:-held] for k, v in examples.items()}, {k: v[-held:] for k, v in examples.items()}


def _examples(path: Path, tokenizer: Any, seq_len: int, pairs: bool) -> Batch:
    if path.suffix == ".txt":
        if pairs:
            raise DataError(f"{path}: a sentence encoder trains on pairs, not plain text: give JSONL or Parquet records "
                            '{"anchor": ..., "positive": ...}')
        text = _utf8(path)
        if not text.strip():
            raise DataError(f"{path} holds no text")
        return _text(text, tokenizer, seq_len, path)
    if path.suffix == ".jsonl":
        return _from_records(_jsonl(path), tokenizer, seq_len, path, pairs)
    if path.suffix == ".parquet":
        return _from_records(_parquet(path), tokenizer, seq_len, path, pairs)
    raise DataError(f"{path}: data files are {', '.join(SUFFIXES)} (or a folder saved by datasets' save_to_disk)")


def _utf8(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {exc.start}); convert it, or check it is the file meant") from None


def _jsonl(path: Path) -> list[Record]:
    records = []
    for line, text in enumerate(_utf8(path).splitlines(), start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line}: not a JSON object ({exc.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: each line must be a JSON object")
        records.append((f"{path}:{line}", record))
    return records


def _parquet(path: Path) -> list[Record]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install 'cipherswarm[data]'") from None
    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow's own error for a file that is not Parquet or is cut short
        raise DataError(f"{path}: not a readable Parquet file ({exc})") from None
    return [(f"{path} row {i}", row) for i, row in enumerate(rows)]


def _saved_dataset(folder: Path, tokenizer: Any, seq_len: int, pairs: bool) -> tuple[Batch, Batch]:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    try:
        from datasets import DatasetDict, load_from_disk
    except ImportError:
        raise DataError(f"{folder}: reading a saved dataset needs datasets: pip install 'cipherswarm[data]'") from None
    try:
        loaded = load_from_disk(str(folder))
    except Exception as exc:  # datasets' own error for a damaged folder
        raise DataError(f"{folder}: not a readable saved dataset ({exc})") from None

    def examples(split: Any, name: str) -> Batch:
        where = folder / name if name else folder
        return _from_records([(f"{where} row {i}", row) for i, row in enumerate(split)], tokenizer, seq_len, where, pairs)

    if not isinstance(loaded, DatasetDict):
        return _split(examples(loaded, ""), folder, pairs)
    if "train" not in loaded:
        raise DataError(f"{folder}: the saved dataset has splits {sorted(loaded)}, none of them 'train'")
    valid = next((name for name in VALID_SPLITS if name in loaded), None)
    if valid is None:
        return _split(examples(loaded["train"], "train"), folder, pairs)
    return examples(loaded["train"], "train"), examples(loaded[valid], valid)


def _from_records(records: list[Record], tokenizer: Any, seq_len: int, path: Path, pairs: bool) -> Batch:
    if not records:
        raise DataError(f"{path} holds no records")
    kinds = {_kind(record, where) for where, record in records}
    if len(kinds) > 1:
        raise DataError(f"{path} mixes record kinds {sorted(kinds)}: use one per file")
    kind = kinds.pop()
    if pairs != (kind == "pair"):
        raise DataError(f"{path}: anchor/positive records train a sentence encoder, and this model is a causal LM"
                        if not pairs else
                        f"{path}: a sentence encoder trains on records {{\"anchor\": ..., \"positive\": ...}}, not {kind} records")
    if kind == "text":
        eos = tokenizer.eos_token or ""
        return _text(eos.join(r["text"] for _, r in records), tokenizer, seq_len, path)
    wheres = [where for where, _ in records]
    if kind == "pair":
        rows = [_plain(r[name], tokenizer) for _, r in records for name in ("anchor", "positive")]
        flat = _padded(rows, tokenizer, seq_len, [where for where in wheres for _ in range(2)])
        return {k: v.view(len(records), 2, seq_len) for k, v in flat.items()}
    made = [_prompt_completion(r, tokenizer) if kind == "completion" else _chat(r, tokenizer, where) for where, r in records]
    return _padded(made, tokenizer, seq_len, wheres)


def _kind(record: dict, where: str) -> str:
    if isinstance(record.get("messages"), list):
        return "chat"
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return "completion"
    if isinstance(record.get("anchor"), str) and isinstance(record.get("positive"), str):
        return "pair"
    if isinstance(record.get("text"), str):
        return "text"
    raise DataError(f"{where}: a record needs \"text\", \"prompt\" and \"completion\", \"messages\", or \"anchor\" and "
                    f"\"positive\" (got keys {sorted(record)})")


def _text(text: str, tokenizer: Any, seq_len: int, path: Path) -> Batch:
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    count = len(ids) // seq_len
    if count == 0:
        raise DataError(f"{path} holds {len(ids)} tokens, fewer than one sequence of {seq_len}")
    seqs = torch.tensor(ids[: count * seq_len], dtype=torch.long).view(count, seq_len)
    return {"input_ids": seqs, "attention_mask": torch.ones_like(seqs), "labels": seqs.clone()}


def _plain(text: str, tokenizer: Any) -> tuple[list[int], list[int]]:
    """A sentence as its tokenizer encodes it (an encoder's [CLS] ... [SEP]), every token real."""
    ids = tokenizer(text, return_attention_mask=False)["input_ids"]
    return ids, list(ids)


def _prompt_completion(record: dict, tokenizer: Any) -> tuple[list[int], list[int]]:
    prompt = tokenizer(record["prompt"], return_attention_mask=False)["input_ids"]
    full = tokenizer(record["prompt"] + record["completion"], return_attention_mask=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        full = full + [tokenizer.eos_token_id]  # the model learns to stop after the completion
    cut = _common_prefix(prompt, full)
    return full, [IGNORE_INDEX] * cut + full[cut:]


def _chat(record: dict, tokenizer: Any, where: str) -> tuple[list[int], list[int]]:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{where}: chat records need a tokenizer with a chat template; this model's has none "
                        "(use prompt/completion records)")
    if not getattr(tokenizer, "is_fast", False):
        raise DataError(f"{where}: chat records need a fast tokenizer (token offsets tell the assistant's tokens "
                        "apart); this model has only a slow one (use prompt/completion records)")
    messages = record["messages"]
    if not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise DataError(f"{where}: each message needs a \"role\" and a \"content\" string")
    text = _render(tokenizer, messages, where, generation_prompt=False)
    spans = []  # character spans of the assistant's turns in the rendered text
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        upto = _render(tokenizer, messages[: i + 1], where, generation_prompt=False)
        if not text.startswith(upto):
            raise DataError(f"{where}: the chat template renders earlier turns differently once later ones follow; "
                            "the assistant's tokens cannot be told apart")
        spans.append((len(_render(tokenizer, messages[:i], where, generation_prompt=True)), len(upto)))
    if not spans:
        raise DataError(f"{where}: the conversation has no assistant turn to learn from")
    # the template writes any special tokens itself; offsets say which characters each token covers
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    ids = list(enc["input_ids"])
    labels = [t if any(a <= start < b for a, b in spans) else IGNORE_INDEX
              for t, (start, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def _render(tokenizer: Any, messages: list[dict], where: str, *, generation_prompt: bool) -> str:
    if not messages and not generation_prompt:
        return ""
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # the template's own error (a jinja exception, a role it refuses)
        raise DataError(f"{where}: the chat template refused the conversation: {exc}") from None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _padded(rows: list[tuple[list[int], list[int]]], tokenizer: Any, seq_len: int, wheres: list[str]) -> Batch:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    ids = torch.full((len(rows), seq_len), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), seq_len), dtype=torch.long)
    labels = torch.full((len(rows), seq_len), IGNORE_INDEX, dtype=torch.long)
    for i, ((row_ids, row_labels), where) in enumerate(zip(rows, wheres)):
        if len(row_ids) > seq_len:
            raise DataError(f"{where}: {len(row_ids)} tokens, longer than --seq-len {seq_len}; raise it or shorten the record")
        ids[i, : len(row_ids)] = torch.tensor(row_ids)
        mask[i, : len(row_ids)] = 1
        labels[i, : len(row_ids)] = torch.tensor(row_labels)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}
