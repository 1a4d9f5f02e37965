"""Fine-tuning data from files: text, prompt/completion and chat JSONL, with the loss only where
the model is asked to write, and a clear error for every unusable input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cipherswarm.trainer.data import DataError, load_examples
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL, FinetuneConfig, finetune

IGNORE = -100
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok():
    t = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    t.model_max_length = 1 << 30
    return t


def _jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_a_text_folder_is_consecutive_sequences(tok) -> None:
    train, valid = load_examples(BUNDLED_DATA, tok, 64)
    ids = tok((BUNDLED_DATA / "train.txt").read_text(), return_attention_mask=False)["input_ids"]
    assert train["input_ids"].flatten().tolist() == ids[: train["input_ids"].numel()]
    assert torch.equal(train["labels"], train["input_ids"]) and bool(train["attention_mask"].all())
    assert len(valid["input_ids"]) > 0


def test_one_file_holds_out_its_last_tenth(tok, tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text((BUNDLED_DATA / "valid.txt").read_text())
    train, valid = load_examples(path, tok, 64)
    whole = len(train["input_ids"]) + len(valid["input_ids"])
    assert len(valid["input_ids"]) == max(1, whole // 10)


def test_prompt_completion_learns_the_completion_only(tok, tmp_path: Path) -> None:
    records = [{"prompt": f"Question {i}: who speaks first?", "completion": f" The master, scene {i}."} for i in range(12)]
    train, _ = load_examples(_jsonl(tmp_path / "qa.jsonl", records), tok, 48)
    ids, labels, mask = train["input_ids"][0], train["labels"][0], train["attention_mask"][0]
    learned = [t for t, label in zip(ids.tolist(), labels.tolist()) if label != IGNORE]
    assert tok.decode(learned).strip() == "The master, scene 0.</s>"
    assert labels[mask == 0].eq(IGNORE).all() and mask.sum() < 48  # padding: no loss, no attention


def test_chat_learns_the_assistant_turns_token_by_token(tok, tmp_path: Path) -> None:
    tok = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    tok.chat_template = TEMPLATE
    chat = [{"role": "system", "content": "You speak as Prospero."},
            {"role": "user", "content": "Who raised the storm?"},
            {"role": "assistant", "content": "I did, by my art."},
            {"role": "user", "content": "Why?"},
            {"role": "assistant", "content": "To bring mine enemies ashore."}]
    train, _ = load_examples(_jsonl(tmp_path / "chat.jsonl", [{"messages": chat}] * 4), tok, 96)
    ids, labels = train["input_ids"][0].tolist(), train["labels"][0].tolist()
    text = tok.apply_chat_template(chat, tokenize=False)
    assert ids[: len(tok(text, add_special_tokens=False)["input_ids"])] == tok(text, add_special_tokens=False)["input_ids"]
    # each labelled token is the input token at its position, and together they are exactly the two answers
    runs, current = [], []
    for t, label in zip(ids, labels):
        if label == IGNORE:
            if current:
                runs.append(current)
            current = []
        else:
            assert label == t
            current.append(t)
    assert [tok.decode(r) for r in runs] == ["I did, by my art.</s>\n", "To bring mine enemies ashore.</s>\n"]


def test_a_chat_file_fine_tunes(tmp_path: Path) -> None:
    model = tmp_path / "model"
    AutoTokenizer.from_pretrained(BUNDLED_MODEL).save_pretrained(model)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL).save_pretrained(model)
    saved = AutoTokenizer.from_pretrained(model)
    saved.chat_template = TEMPLATE
    saved.save_pretrained(model)
    chats = [{"messages": [{"role": "user", "content": f"Say line {i}."}, {"role": "assistant", "content": f"Line {i}, my lord."}]}
             for i in range(20)]
    data = _jsonl(tmp_path / "chat.jsonl", chats)
    result = finetune(FinetuneConfig(model_dir=model, data_dir=data, steps=2, seq_len=48, batch_size=4, eval_batches=1),
                      fhe="simulate", progress=False)
    assert len(result.losses) == 2 and result.eval_after < result.eval_before
    assert 0 < result.records[0].tokens < 4 * 48  # padding is not counted


@pytest.mark.parametrize(("lines", "match"), [
    (['{"text": "a"}', "not json"], r"chat\.jsonl:2: not a JSON object"),
    (['{"question": "a"}'], r"chat\.jsonl:1: a record needs"),
    (['{"text": "a"}', '{"prompt": "a", "completion": "b"}'], "mixes record kinds"),
    ([""], "holds no records"),
    (['{"prompt": "' + "word " * 200 + '", "completion": "b"}'] * 3, r"chat\.jsonl:1: \d+ tokens, longer than --seq-len 32"),
    (['{"messages": [{"role": "user", "content": "hi"}]}'], "need a tokenizer with a chat template"),
    (['{"prompt": "a", "completion": "b"}'], r"1 example\(s\): at least 2"),
])
def test_unusable_data_is_refused_with_its_line(tok, tmp_path: Path, lines: list[str], match: str) -> None:
    path = tmp_path / "chat.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=match):
        load_examples(path, tok, 32)


def test_folders_and_files_that_are_not_data(tok, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no train.txt or train.jsonl"):
        load_examples(tmp_path, tok, 32)
    (tmp_path / "train.txt").write_text("x")
    (tmp_path / "train.jsonl").write_text("{}")
    with pytest.raises(DataError, match="keep one"):
        load_examples(tmp_path, tok, 32)
    with pytest.raises(DataError, match=r"\.txt or \.jsonl"):
        load_examples(tmp_path / "data.csv", tok, 32) if (tmp_path / "data.csv").write_text("a,b") else None
