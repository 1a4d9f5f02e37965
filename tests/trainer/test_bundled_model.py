"""The bundled tiny LLaMA model, its tokenizer and the LoRA fine-tuning set (trainer/assets/).

These load the real files from disk, offline, and check what trainer/assets/README.md documents.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

ASSETS = Path(__file__).resolve().parents[2] / "trainer" / "assets"
MODEL_DIR = ASSETS / "tiny-shakespeare-llama"
FINETUNE_DIR = ASSETS / "finetune"

DOCUMENTED = {
    "vocab_size": 2048,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "head_dim": 32,
    "max_position_embeddings": 256,
    "tie_word_embeddings": True,
}
DOCUMENTED_PARAMETERS = 1_115_264


@pytest.fixture(scope="module")
def info() -> dict:
    return json.loads((MODEL_DIR / "training_info.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return transformers.AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    m.eval()
    return m


def _stream(tokenizer, text: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    return torch.tensor([tokenizer.bos_token_id, *ids, tokenizer.eos_token_id])


@torch.no_grad()
def _mean_loss(model, stream: torch.Tensor, seq_len: int) -> float:
    """Mean next-token loss over non-overlapping windows, as examples/pretrain_tiny.py computes it."""
    chunks = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)
    total, count = 0.0, 0
    for i in range(0, len(chunks), 16):
        x = chunks[i : i + 16]
        n = x.numel() - x.shape[0]
        total += model(input_ids=x, labels=x).loss.item() * n
        count += n
    return total / count


def test_asset_folder_is_complete_and_small():
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "training_info.json",
    ):
        assert (MODEL_DIR / name).is_file(), name
    assert (ASSETS / "README.md").is_file()
    total = sum(p.stat().st_size for p in ASSETS.rglob("*") if p.is_file())
    assert total < 20 * 2**20, f"trainer/assets is {total / 2**20:.1f} MiB"
    # No pickled weights: safetensors only.
    assert not list(MODEL_DIR.glob("*.bin")) and not list(MODEL_DIR.glob("*.pt"))


def test_config_is_llama_with_documented_sizes(info):
    config = transformers.AutoConfig.from_pretrained(MODEL_DIR, local_files_only=True)
    assert config.model_type == "llama"
    assert config.architectures == ["LlamaForCausalLM"]
    for key, value in DOCUMENTED.items():
        assert getattr(config, key) == value, key
        assert info["model"]["config"][key] == value, key
    assert info["model"]["parameters"] == DOCUMENTED_PARAMETERS


def test_model_loads_as_llama_with_ring_friendly_linear_shapes(model):
    assert isinstance(model, transformers.LlamaForCausalLM)
    assert sum(p.numel() for p in model.parameters()) == DOCUMENTED_PARAMETERS
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # Tied embeddings: the output head is the input embedding matrix.
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    linears = {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, torch.nn.Linear) and name != "lm_head"
    }
    assert len(linears) == DOCUMENTED["num_hidden_layers"] * 7  # q, k, v, o, gate, up, down
    for name, lin in linears.items():
        assert lin.bias is None, name
        assert lin.in_features % 32 == 0 and lin.out_features % 32 == 0, (name, lin.weight.shape)
    layer = model.model.layers[0]
    assert tuple(layer.self_attn.q_proj.weight.shape) == (128, 128)
    assert tuple(layer.mlp.up_proj.weight.shape) == (384, 128)
    assert tuple(layer.mlp.down_proj.weight.shape) == (128, 384)


def test_tokenizer_special_tokens_and_round_trip(tokenizer, model):
    assert len(tokenizer) == model.config.vocab_size == DOCUMENTED["vocab_size"]
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<s>", "</s>", "<pad>")
    assert tokenizer.bos_token_id == model.config.bos_token_id == model.generation_config.bos_token_id
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == model.config.pad_token_id == model.generation_config.pad_token_id
    assert len({tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}) == 3

    text = "PROSPERO:\nOur revels now are ended. These our actors,\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id  # like LLaMA, <s> is prepended by default
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    # Byte-level BPE: text it never saw still round-trips exactly.
    odd = "caf\u00e9 \u2014 na\u00efve \u2713 \U0001f3ad\t{x: 1}"
    assert tokenizer.decode(tokenizer(odd, add_special_tokens=False)["input_ids"]) == odd
    # Merges were learned: English compresses well below one token per character.
    assert len(tokenizer(text, add_special_tokens=False)["input_ids"]) < len(text) / 2


def test_finetune_files_exist_and_are_disjoint(tokenizer):
    train = (FINETUNE_DIR / "train.txt").read_text(encoding="utf-8")
    valid = (FINETUNE_DIR / "valid.txt").read_text(encoding="utf-8")
    for text in (train, valid):
        assert 15_000 < len(text.encode()) < 200_000
        assert text.count("\n") > 500
        assert "PROSPERO:" in text  # the held-out play is The Tempest
    assert train.startswith("The Tempest")
    assert valid.startswith("ACT IV")
    # Disjoint slices: no long passage of the validation text appears in the training text.
    paragraphs = [p for p in valid.split("\n\n") if len(p) > 200]
    assert len(paragraphs) > 20
    assert not any(p in train for p in paragraphs)
    assert len(_stream(tokenizer, train)) > 10_000 and len(_stream(tokenizer, valid)) > 5_000


def test_valid_loss_is_finite_and_beats_uniform_guess(model, tokenizer, info):
    valid = (FINETUNE_DIR / "valid.txt").read_text(encoding="utf-8")
    seq_len = info["args"]["lora_seq_len"]
    loss = _mean_loss(model, _stream(tokenizer, valid), seq_len)
    uniform = math.log(model.config.vocab_size)
    assert math.isfinite(loss)
    assert loss < uniform - 2.0, (loss, uniform)
    # Same number the build script recorded for the untuned model.
    before = info["lora_check"]["runs"][0]["valid_loss_before"]
    assert loss == pytest.approx(before, abs=0.02)


def test_recorded_lora_check_lowered_held_out_loss(info):
    runs = info["lora_check"]["runs"]
    assert runs[0]["target_modules"] == ["q_proj", "v_proj"]
    for run in runs:
        assert run["r"] == 8 and 50 <= run["steps"] <= 100
        assert run["valid_loss_after"] < run["valid_loss_before"] - 0.05, run


def test_lora_steps_on_finetune_text_reduce_loss(tokenizer):
    peft = pytest.importorskip("peft")
    base = transformers.AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    torch.manual_seed(0)
    model = peft.get_peft_model(
        base,
        peft.LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"),
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == 4 * 2 * 8 * (128 + 128)
    train = (FINETUNE_DIR / "train.txt").read_text(encoding="utf-8")
    x = _stream(tokenizer, train)[: 4 * 128].view(4, 128)
    opt = torch.optim.AdamW(trainable, lr=3e-3)
    model.train()
    losses = []
    for _ in range(10):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 0.1, losses


def test_generate_from_prompt(model, tokenizer):
    enc = tokenizer("ROMEO:\n", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=24, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 24 or out[0, -1] == tokenizer.eos_token_id
    text = tokenizer.decode(out[0], skip_special_tokens=True)
    assert text.startswith("ROMEO:\n") and len(text) > len("ROMEO:\n") + 10
