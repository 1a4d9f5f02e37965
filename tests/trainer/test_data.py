"""Fine-tuning data from files: text, prompt/completion, chat and pair records from JSONL, Parquet
or a saved dataset, with the loss only where the model is asked to write, a clear error for every
unusable input, and greedy samples that show what the fine-tune changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from cipherswarm.trainer.data import DataError, load_examples
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL, FinetuneConfig, finetune, samples, sample_prompts

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
    result = finetune(FinetuneConfig(model_dir=model, data_dir=data, steps=4, seq_len=48, batch_size=4, eval_batches=1,
                                     lr=1e-2), fhe="simulate", progress=False)
    assert len(result.losses) == 4 and result.eval_after < result.eval_before
    assert 0 < result.records[0].tokens < 4 * 48  # padding is not counted
    # greedy samples of the first held-out prompts: each prompt is the conversation up to the answer
    assert len(result.samples) == 2 and all(s["prompt"].endswith("<|assistant|>\n") for s in result.samples)
    assert any(s["before"] != s["after"] for s in result.samples), result.samples
    trainer, prompts = result.trainer, sample_prompts(result.trainer.eval_loader)
    assert samples(trainer, saved, prompts) == [s["after"] for s in result.samples]  # "after" is the trained adapter's
    with trainer.model.disable_adapter():  # and "before" the base model's
        assert samples(trainer, saved, prompts) == [s["before"] for s in result.samples]


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
    with pytest.raises(DataError, match=r"has no train\.txt/\.jsonl/\.parquet and is not a folder saved by datasets"):
        load_examples(tmp_path, tok, 32)
    (tmp_path / "train.txt").write_text("x")
    (tmp_path / "train.jsonl").write_text("{}")
    with pytest.raises(DataError, match="keep one"):
        load_examples(tmp_path, tok, 32)
    with pytest.raises(DataError, match=r"\.txt, \.jsonl, \.parquet"):
        load_examples(tmp_path / "data.csv", tok, 32) if (tmp_path / "data.csv").write_text("a,b") else None


def _records(n: int = 12) -> list[dict]:
    return [{"prompt": f"Question {i}: who speaks first?", "completion": f" The master, scene {i}."} for i in range(n)]


def test_parquet_and_saved_datasets_are_records_like_jsonl(tok, tmp_path: Path) -> None:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    from_jsonl = load_examples(_jsonl(tmp_path / "qa.jsonl", _records()), tok, 48)
    pq.write_table(pa.Table.from_pylist(_records()), tmp_path / "qa.parquet")
    from_parquet = load_examples(tmp_path / "qa.parquet", tok, 48)
    datasets.Dataset.from_list(_records()).save_to_disk(str(tmp_path / "saved"))
    from_saved = load_examples(tmp_path / "saved", tok, 48)  # one split: the last tenth held out, as for a file
    for got in (from_parquet, from_saved):
        for part, want in zip(got, from_jsonl):
            assert all(torch.equal(part[k], want[k]) for k in want)
    # a DatasetDict's validation split is the held-out set
    datasets.DatasetDict({"train": datasets.Dataset.from_list(_records()[:8]),
                          "validation": datasets.Dataset.from_list(_records()[8:])}).save_to_disk(str(tmp_path / "dict"))
    train, valid = load_examples(tmp_path / "dict", tok, 48)
    assert len(train["input_ids"]) == 8 and len(valid["input_ids"]) == 4
    assert tok.decode([t for t in valid["labels"][0].tolist() if t != IGNORE]).strip() == "The master, scene 8.</s>"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(_records())}).save_to_disk(str(tmp_path / "nosplit"))
    with pytest.raises(DataError, match="none of them 'train'"):
        load_examples(tmp_path / "nosplit", tok, 48)


def test_pairs_are_two_rows_per_example_and_only_for_encoders(tok, tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "pairs.jsonl", [{"anchor": f"line {i}", "positive": f"the line numbered {i}"} for i in range(10)])
    train, valid = load_examples(path, tok, 16, pairs=True)
    assert train["input_ids"].shape == (8, 2, 16) and valid["input_ids"].shape == (2, 2, 16)  # two pairs held out
    positive = train["input_ids"][3, 1][train["attention_mask"][3, 1] == 1]
    assert tok.decode(positive.tolist()) == tok.decode(tok("the line numbered 3")["input_ids"])
    with pytest.raises(DataError, match="train a sentence encoder, and this model is a causal LM"):
        load_examples(path, tok, 16)
    with pytest.raises(DataError, match="sentence encoder trains on pairs, not plain text"):
        load_examples(BUNDLED_DATA / "valid.txt", tok, 16, pairs=True)
    with pytest.raises(DataError, match=r"not completion records"):
        load_examples(_jsonl(tmp_path / "qa.jsonl", _records()), tok, 48, pairs=True)


def test_empty_and_garbled_files_are_refused(tok, tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text(" \n\n")
    with pytest.raises(DataError, match="empty.txt holds no text"):
        load_examples(tmp_path / "empty.txt", tok, 32)
    (tmp_path / "latin1.txt").write_bytes("first line\nd\u00e9j\u00e0 vu".encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1.txt:2: not UTF-8 text \(byte 12\)"):
        load_examples(tmp_path / "latin1.txt", tok, 32)
    (tmp_path / "binary.jsonl").write_bytes(bytes(range(256)))
    with pytest.raises(DataError, match="binary.jsonl:2: not UTF-8"):  # byte 10 ends line 1
        load_examples(tmp_path / "binary.jsonl", tok, 32)
    (tmp_path / "cut.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="cut.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "cut.parquet", tok, 32)
