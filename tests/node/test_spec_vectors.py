"""The examples of protocol/README.md section 12 recomputed from the code: an outside implementer
who follows the text gets these bytes, and a change to the code that changes them fails here."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from cipherswarm.fhe_backend.params import WeightStats, choose_params
from cipherswarm.fhe_backend.quant import quantize_weight
from cipherswarm.node.engine import encode_params
from cipherswarm.node.weights import Layer, ModelWeights, is_remote_layer

README = (Path(__file__).resolve().parents[2] / "protocol" / "README.md").read_text()
SECTION = README[README.index("## 12. Names, digests"):]
UP = torch.tensor([[0.5, -1.0, 0.25], [2.0, 0.0, -0.75]])  # nn.Linear(3, 2).weight, as stored
DOWN = torch.tensor([[1.0, -0.5], [0.125, 0.25], [-2.0, 1.5]])  # nn.Linear(2, 3).weight


def _hex(text: str) -> str:
    return re.sub(r"\s", "", text)


def test_quantization_and_digests() -> None:
    up, down = quantize_weight(UP.t(), 8), quantize_weight(DOWN.t(), 8)
    assert up.q.tolist() == [[64, 127], [-127, 0], [32, -48]] and down.q.tolist() == [[127, 64, -127], [-64, 127, 95]]
    for q in (up, down):
        assert f"Wq = {q.q.tolist()}" in SECTION
        assert f"(bytes\n`{q.q.numpy().tobytes().hex()}`)" in SECTION or f"bytes `{q.q.numpy().tobytes().hex()}`" in SECTION
        assert f"`{q.digest}`" in SECTION


def test_model_hash() -> None:
    layers = [Layer.summarise("model.layers.0.mlp.up_proj.weight", quantize_weight(UP.t(), 8), keep=False),
              Layer.summarise("model.layers.0.mlp.down_proj.weight", quantize_weight(DOWN.t(), 8), keep=False)]
    assert f"`{ModelWeights(layers).model_hash.hex()}`" in SECTION


def test_backend_params_bytes() -> None:
    params = choose_params(WeightStats(l1=1000, l2sq=100000), 8)
    named = ", ".join(f"{name} = {value}" for name, value in zip(params.FIELDS, params.to_tuple()))
    assert _hex(named) in _hex(SECTION.replace("`", ""))
    block = SECTION[SECTION.index("```hex") + 6 : SECTION.index("```", SECTION.index("```hex") + 6)]
    assert _hex(block) == encode_params(params).hex()


def test_the_selection_rule_as_written() -> None:
    for name, remote in [("model.layers.0.mlp.up_proj.weight", True), ("model.embed_tokens.weight", False),
                         ("model.layers.0.input_layernorm.weight", False), ("lm_head.weight", False),
                         ("transformer.h.0.ln_1.weight", False), ("transformer.wte.weight", False),
                         ("model.layers.0.mlp.up_proj.bias", False)]:
        assert is_remote_layer(name, 2, True) is remote, name
