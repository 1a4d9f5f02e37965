"""compile() measures the quantized model against the float one: the figures are the real ones (a
thin model, computing from disk, gets the very same), they move the right way with the bits, and
too few bits warn with the layers named."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import pytest
import torch
from trainer_factory import LLAMA, lora_trainer, base_model, token_data

from cipherswarm.node.weights import group_members
from cipherswarm.trainer import AccuracyWarning, LoraTrainer, Precision, causal_lm_loss
from cipherswarm.trainer.thin import load_remote_model


def _trainer(model: torch.nn.Module) -> LoraTrainer:
    return lora_trainer(model, LLAMA)


def _compiled(precision: Precision, batch: torch.Tensor) -> LoraTrainer:
    trainer = _trainer(base_model(LLAMA))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AccuracyWarning)
        trainer.compile(batch, precision=precision)
    return trainer


def test_the_figures_are_those_of_the_quantized_forward() -> None:
    """Per-layer errors recomputed by hand from the layer's own integers, and the logits' figures
    from a separate simulate forward, match what compile() reported."""
    batch = token_data(2, 12)
    trainer = _compiled(Precision(8, 8, 8), batch)
    report = trainer.accuracy
    assert report is not None and report.tokens == batch.numel()
    # per layer, whether it was computed alone or as a member of a group (q/k/v, gate/up)
    assert set(report.layers) == {k for key in trainer.layer_specs() for k in group_members(key)}
    assert any(len(group_members(key)) == 3 for key in trainer.layer_specs())
    with torch.no_grad():
        plain = trainer.model(input_ids=batch).logits.double()
        with trainer.fhe_mode("simulate"):
            quantized = trainer.model(input_ids=batch).logits.double()
    assert report.logits_rel_error == pytest.approx(float((quantized - plain).norm() / plain.norm()), rel=1e-9)
    assert report.top1_agreement == pytest.approx(float((quantized.argmax(-1) == plain.argmax(-1)).double().mean()))
    expect_loss = float(causal_lm_loss(quantized, batch)) / float(causal_lm_loss(plain, batch)) - 1
    assert report.loss_rel_change == pytest.approx(expect_loss, abs=1e-6)  # losses in the model's float32
    assert all(0 < e < 0.1 for e in report.layers.values())


def test_more_bits_less_error() -> None:
    batch = token_data(2, 12)
    coarse, fine = (_compiled(p, batch).accuracy for p in (Precision(6, 6, 6), Precision(16, 16, 16)))
    assert coarse is not None and fine is not None
    assert fine.logits_rel_error < coarse.logits_rel_error / 20
    assert max(fine.layers.values()) < min(coarse.layers.values())


def test_too_few_bits_warn_naming_the_layers() -> None:
    trainer = _trainer(base_model(LLAMA))
    with pytest.warns(AccuracyWarning, match=r"layer\(s\) above 2% relative error: model\.layers\.\d+\.") as caught:
        trainer.compile(token_data(2, 12), precision=Precision(3, 3, 4))
    assert "Precision(forward_bits=16" in str(caught[0].message)  # says what to try
    with warnings.catch_warnings():
        warnings.simplefilter("error", AccuracyWarning)
        trainer.compile(token_data(2, 12))  # the defaults: no warning on this model


def test_a_thin_model_reports_the_same_figures(tmp_path: Path) -> None:
    """The thin client computes the check's products from weights read off disk: the same integers."""
    base_model(LLAMA).save_pretrained(tmp_path, safe_serialization=True)
    batch = token_data(2, 12)
    full = _trainer(base_model(LLAMA))
    full.compile(batch)
    thin_model, _ = load_remote_model(tmp_path)
    thin = _trainer(thin_model)
    thin.compile(batch)
    assert full.accuracy is not None and thin.accuracy is not None
    assert thin.accuracy.layers.keys() == full.accuracy.layers.keys()
    for key, err in full.accuracy.layers.items():
        assert math.isclose(thin.accuracy.layers[key], err, rel_tol=1e-6), key
    assert thin.accuracy.top1_agreement == full.accuracy.top1_agreement
    assert thin.accuracy.logits_rel_error == pytest.approx(full.accuracy.logits_rel_error, rel=1e-6)


def test_a_thin_model_refuses_other_weight_bits(tmp_path: Path) -> None:
    base_model(LLAMA).save_pretrained(tmp_path, safe_serialization=True)
    thin_model, weights = load_remote_model(tmp_path, weight_bits=10)
    assert weights.weight_bits == 10
    with pytest.raises(ValueError, match="loaded with 10-bit weights, the precision asks for 11"):
        _trainer(thin_model).compile(token_data(1, 8))


def test_the_check_can_be_skipped() -> None:
    trainer = _trainer(base_model(LLAMA))
    trainer.compile(token_data(1, 8), check_accuracy=False)
    assert trainer.accuracy is None and trainer.compiled


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"n_bits": 8, "precision": Precision()}, "not both"),
    ({"precision": None, "n_bits": 17}, r"n_bits must be an int in \[2, 16\]"),
])
def test_bad_bit_arguments(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        _trainer(base_model(LLAMA)).compile(token_data(1, 8), **kwargs)


@pytest.mark.parametrize(("fields", "match"), [
    ((1, 8, 12), r"forward_bits must be an int in \[2, 16\]"),
    ((8, 17, 12), r"backward_bits must be an int in \[2, 16\]"),
    ((8, 8, 3), r"weight_bits must be an int in \[4, 16\]"),
    ((8, 8, 12.0), r"weight_bits must be an int"),
])
def test_precision_is_validated(fields: tuple, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Precision(*fields)


def test_n_bits_means_both_directions() -> None:
    assert Precision.of(10) == Precision(10, 10, Precision().weight_bits)
    assert Precision.of(None) == Precision()
    assert Precision.of(8, weight_bits=8) == Precision(8, 8, 8)


def test_the_check_runs_on_at_most_max_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two copies of the logits are held: the check takes whole sequences up to MAX_TOKENS, at least one."""
    from cipherswarm.trainer import accuracy

    monkeypatch.setattr(accuracy, "MAX_TOKENS", 20)
    assert _compiled(Precision(), token_data(3, 8)).accuracy.tokens == 16  # type: ignore[union-attr]
    assert _compiled(Precision(), token_data(3, 30)).accuracy.tokens == 30  # type: ignore[union-attr]
