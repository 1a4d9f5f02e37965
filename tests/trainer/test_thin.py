"""The client's model without its base weights: nothing of a remote weight in memory, the same plain
results as the full model (weights read from the files per product), and a trainer model that
differs from the served checkpoint refused before the first product."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from trainer_factory import LLAMA, VOCAB, base_model, lora_trainer, token_data

from cipherswarm.node import ModelMismatchError, SwarmClient, load_model
from cipherswarm.trainer import LoraTrainer, RemoteLinear
from cipherswarm.trainer.layers import module_key
from cipherswarm.trainer.thin import ThinLinear, load_remote_model

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("llama")
    base_model(LLAMA).save_pretrained(path, safe_serialization=True)
    return path


def _trainer(model: torch.nn.Module) -> LoraTrainer:
    return lora_trainer(model, LLAMA)


def test_no_remote_weight_is_resident(saved: Path) -> None:
    model, weights = load_remote_model(saved)
    trainer = _trainer(model)
    trainer.compile(token_data(1, 8))
    assert not weights.held and len(weights.layers) == LLAMA.remote_layers
    remote = [m for m in trainer.model.modules() if isinstance(m, RemoteLinear)]
    assert len(remote) == LLAMA.remote_layers and all(m.thin and isinstance(m.original, ThinLinear) for m in remote)
    seen = set()
    for name, t in [*trainer.model.named_parameters(), *trainer.model.named_buffers()]:
        tensor_name = module_key(name).removeprefix("base_model.model.")
        if tensor_name in weights.layers:
            seen.add(tensor_name)
            assert t.untyped_storage().nbytes() <= 8, f"{name} holds {t.untyped_storage().nbytes()} bytes"
    assert seen == set(weights.layers)
    for layer in weights.layers.values():  # the summary is a few bytes per output channel
        assert layer.weight is None and layer.summary_bytes <= 16 * (layer.shape.d_in + layer.shape.d_out)


def test_plain_mode_reads_the_files_and_matches_the_full_model(saved: Path) -> None:
    data = token_data(4, 8)
    losses = []
    for model in (base_model(LLAMA), load_remote_model(saved)[0]):
        trainer = _trainer(model)
        trainer.compile(data[:1])
        trainer.train(torch.utils.data.DataLoader(data, batch_size=2), fhe="disable", progress=False)
        losses.append(trainer.get_training_losses())
    assert losses[0] == losses[1] and len(losses[0]) == 2


def test_local_encrypted_modes_are_refused_without_weights(saved: Path) -> None:
    trainer = _trainer(load_remote_model(saved)[0])
    trainer.compile(token_data(1, 8))
    for fhe in ("simulate", "execute"):
        with pytest.raises(ValueError, match="load_remote_model"):
            trainer.train([token_data(1, 8)], fhe=fhe, progress=False)


@pytest.mark.parametrize("change", ["negated mlp", "bfloat16"])
def test_a_model_other_than_the_served_one_is_refused_before_training(saved: Path, change: str) -> None:
    model = base_model(LLAMA)
    if change == "negated mlp":
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "mlp" in name:
                    p.neg_()
    else:
        model = model.to(torch.bfloat16).to(torch.float32)  # what a bf16 trainer quantizes
    trainer = _trainer(model)
    trainer.compile(token_data(1, 8))
    client = SwarmClient(model_dir=saved, weights=load_model(saved, hold=False))  # not started: no product is asked
    with pytest.raises(ModelMismatchError, match="differs from the model the providers serve"):
        trainer.train([token_data(1, 8)], fhe="remote", executor=client, progress=False)
    assert trainer.global_step == 0


def test_the_served_model_itself_is_accepted(saved: Path) -> None:
    trainer = _trainer(load_remote_model(saved)[0])
    trainer.compile(token_data(1, 8))
    SwarmClient(model_dir=saved, weights=load_model(saved, hold=False)).check_layers(
        {k: s.digest for k, s in trainer.layer_specs().items()})


_RSS_SCRIPT = """
import gc, json, sys
import torch, transformers, peft, accelerate, safetensors
import transformers.models.llama.modeling_llama  # the libraries' code is not model state
from cipherswarm.trainer.thin import load_remote_model
def rss():
    return int(open('/proc/self/statm').read().split()[1]) * 4096
before = rss()
model, weights = load_remote_model(sys.argv[1])
gc.collect()
print(json.dumps({"growth": rss() - before}))
"""


def test_loading_grows_memory_by_under_a_tenth_of_the_base_weights(tmp_path: Path) -> None:
    """A model with about 160 MB of float32 base weights (small vocabulary, so they dominate)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=8,
                      num_key_value_heads=8, vocab_size=VOCAB, max_position_embeddings=64)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path, safe_serialization=True)
    base_bytes = sum(layer.shape.d_in * layer.shape.d_out * 4 for layer in load_model(tmp_path, hold=False).layers.values())
    assert base_bytes > 150e6
    out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=300,
                         cwd=REPO, check=True)
    growth = json.loads(out.stdout.strip().splitlines()[-1])["growth"]
    assert growth < 0.1 * base_bytes, f"RSS grew by {growth / 1e6:.1f} MB for {base_bytes / 1e6:.0f} MB of base weights"


@pytest.mark.parametrize("tied", [False, True])
def test_a_bfloat16_checkpoint_keeps_its_embeddings_and_head_narrow(tmp_path: Path, tied: bool) -> None:
    """The client only reads them: stored as bfloat16 they stay so (half a float32 copy), and the
    logits equal the float32 model's exactly (each weight widens exactly; the sums are the same)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      vocab_size=9000, max_position_embeddings=64, tie_word_embeddings=tied)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(tmp_path, safe_serialization=True)
    full = LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    thin, _ = load_remote_model(tmp_path)
    assert thin.get_input_embeddings().weight.dtype == thin.get_output_embeddings().weight.dtype == torch.bfloat16
    ids = torch.randint(0, 9000, (2, 12))
    assert torch.equal(full(input_ids=ids).logits, thin(input_ids=ids).logits)
    x = torch.randn(3, 64, dtype=torch.float32, requires_grad=True)
    thin.get_output_embeddings()(x).square().sum().backward()
    x_full = x.detach().clone().requires_grad_()
    full.get_output_embeddings()(x_full).square().sum().backward()
    assert torch.allclose(x.grad, x_full.grad, rtol=1e-5, atol=1e-5)
