"""One remote-layer rule: the layers a trainer replaces are exactly the tensors a provider loads
from the same checkpoint (``node.weights.is_remote_layer``), for every architecture family here."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BertConfig, BertModel

from cipherswarm.node.weights import load_model
from cipherswarm.trainer.layers import RemoteContext, module_key, wrap_base_layers
from trainer_factory import ARCHS, Arch, base_model

PEFT_PREFIX = "base_model.model."


def _bert() -> torch.nn.Module:
    # A pooler Linear besides the blocks: frozen, not the head, so remote on both sides.
    return BertModel(BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                                vocab_size=64, max_position_embeddings=32))


BERT = Arch("bert", _bert, lambda: LoraConfig(r=2, target_modules=["query", "value"]), skip=0, remote_layers=7)


@pytest.mark.parametrize("arch", [*ARCHS, BERT], ids=lambda a: a.name)
def test_trainer_and_provider_pick_the_same_layers(arch: Arch, tmp_path: Path) -> None:
    model = base_model(arch)
    model.save_pretrained(tmp_path, safe_serialization=True)
    served = set(load_model(tmp_path, hold=False).layers)
    replaced = wrap_base_layers(get_peft_model(model, arch.lora()), RemoteContext(), remote_lm_head=False)
    assert len(replaced) == arch.remote_layers
    assert {f"{key.removeprefix(PEFT_PREFIX)}.weight" for key in replaced} == served


def test_the_head_is_remote_only_when_asked() -> None:
    """The output head is the client's unless remote_lm_head, whatever the name rule says of it."""
    arch = ARCHS[0]
    peft = get_peft_model(base_model(arch), arch.lora())
    head = module_key(next(n for n, m in peft.named_modules() if m is peft.get_output_embeddings()))
    assert head not in wrap_base_layers(peft, RemoteContext(), remote_lm_head=False)
    peft = get_peft_model(base_model(arch), arch.lora())
    assert head in wrap_base_layers(peft, RemoteContext(), remote_lm_head=True)
