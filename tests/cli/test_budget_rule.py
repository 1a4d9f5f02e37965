"""The --budget rule of `cipherswarm train` (cli/train.py Budget) and the stop it drives in
``finetune`` (``on_step``), in process: the client's spending is scripted, the products simulated."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from cipherswarm.cli.train import Budget
from cipherswarm.trainer.checkpoint import checkpoint_folder, latest_checkpoint
from cipherswarm.trainer.errors import TrainingStopped
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, finetune


def _budget(limit: int, steps: int, paid: list[int]) -> Budget:
    """A Budget whose client reports ``paid``, one figure each time it is asked."""
    figures = iter(paid)
    return Budget(limit, steps, lambda: next(figures))


def test_the_next_step_is_refused_when_it_would_take_spending_past_the_budget() -> None:
    # evaluation 10, then steps of 20, 25, 21: each next step is estimated at the dearest so far
    budget = _budget(100, 10, [10, 30, 55, 76])
    assert budget(0) is None  # 10 spent: the first step's cost is unknown until paid
    assert budget(1) is None  # 30 + 20 <= 100
    assert budget(2) is None  # 55 + 25 <= 100
    assert budget(3) == "step 4 would cost about 25"  # 76 + 25 > 100
    assert (budget.spent, budget.step_cost, budget.next_cost) == (76, 25, 25)


def test_before_the_last_step_the_evaluation_after_is_reserved_too() -> None:
    budget = _budget(75, 3, [10, 30, 50])
    assert budget(0) is None and budget(1) is None  # 30 + 20 <= 75
    assert budget(2) == "step 3 and the evaluation after it would cost about 30"  # 50 + 20 + 10 > 75
    resumed = _budget(50, 3, [0, 20])  # resumed at step 1, so no evaluation paid here: a step stands for it
    assert resumed(1) is None and resumed(2) == "step 3 and the evaluation after it would cost about 40"  # 20 + 40 > 50


def test_an_evaluation_over_budget_stops_before_any_step_and_free_work_never_stops() -> None:
    budget = _budget(5, 10, [6])
    assert budget(0) == "the held-out evaluation before training cost 6"
    free = _budget(0, 3, [0, 0, 0])
    assert free(0) is None and free(1) is None and free(2) is None


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=64, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=2, tie_word_embeddings=True)).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, path / name)
    return path


def test_a_stop_checkpoints_that_step_and_resume_gives_the_uninterrupted_run(tiny_model: Path, tmp_path: Path) -> None:
    config = FinetuneConfig(model_dir=tiny_model, steps=4, seq_len=32, batch_size=2)
    checkpoints = tmp_path / "checkpoints"
    asked: list[int] = []

    def stop_after_two(done: int) -> str | None:
        asked.append(done)
        return "enough" if done == 2 else None

    with pytest.raises(TrainingStopped) as stopped:  # save_steps 10: no checkpoint would be due at step 2
        finetune(config, fhe="simulate", progress=False, checkpoint_dir=checkpoints, save_steps=10, on_step=stop_after_two)
    assert asked == [0, 1, 2]  # before the first step, then after each
    assert (stopped.value.reason, stopped.value.step) == ("enough", 2)
    assert stopped.value.checkpoint == latest_checkpoint(checkpoints) == checkpoint_folder(checkpoints, 2)

    asked.clear()
    resumed = finetune(config, fhe="simulate", progress=False, checkpoint_dir=checkpoints, save_steps=10, resume=True,
                       on_step=lambda done: asked.append(done) or None)
    assert asked == [2, 3]  # never after the last step: nothing is left to decide
    reference = finetune(config, fhe="simulate", progress=False)
    assert resumed.resumed_at == 2 and resumed.losses == reference.losses and resumed.eval_after == reference.eval_after
