"""The simulator's workload is the trainer's plan, and the plan is what a trainer does.

``traced_model`` plans a model from its config alone, on the meta device, with the trainer's own
code (trainer/workload.py), and ``cipherswarm estimate`` simulates what it returns. Here a tiny
random-init model of the same config is fine-tuned for real, one optimizer step and one held-out
evaluation, with every executor call recorded; the simulator's calls must be the same, one by one:
group, direction, tokens, contraction and width. Neither side is written from the other's rules, so
a change to the trainer that the plan does not follow fails here.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM

from cipherswarm.node.sim import Workload
from cipherswarm.trainer import BackpropSkipError, LoraTrainer, MatmulExecutor, causal_lm_loss
from cipherswarm.trainer.workload import traced_model

LLAMA: dict[str, Any] = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                         "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128, "tie_word_embeddings": False}
GPT2: dict[str, Any] = {"model_type": "gpt2", "n_embd": 64, "n_layer": 2, "n_head": 4, "vocab_size": 128}
BATCH, SEQ = 2, 8  # one micro-batch of 16 tokens

Call = tuple[str, bool, int, int, int]  # group key, transpose, tokens, contraction, width


class Recording:
    """The compiled model's own in-process executor (``simulate``: exact integer products), noting
    each call it answers."""

    def __init__(self, inner: MatmulExecutor) -> None:
        self.inner = inner
        self.calls: list[Call] = []

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        y = self.inner.matmul(layer_key, x_int, transpose=transpose)
        self.calls.append((layer_key, transpose, x_int.shape[0], x_int.shape[1], y.shape[1]))
        return y


def real_calls(fields: dict[str, Any], targets: list[str] | None, skip: int) -> tuple[list[Call], list[Call]]:
    """The calls a LoraTrainer makes for one training step and one held-out evaluation of a random
    batch, on the random-init model of ``fields`` with LoRA on ``targets`` (None: peft's default)."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**fields))
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM"))
    trainer = LoraTrainer(peft, torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3),
                          loss_fn=causal_lm_loss, n_layers_to_skip_for_backprop=skip, train_log_path=None)
    batch = torch.randint(0, fields["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    trainer.compile(batch, check_accuracy=False)
    executor = Recording(trainer.remote.local_executors["simulate"])
    trainer.train([batch], fhe="remote", executor=executor, max_steps=1, progress=False)
    step, executor.calls = executor.calls, []
    trainer.evaluate([batch], fhe="remote", executor=executor)
    return step, executor.calls


def simulated_calls(fields: dict[str, Any], targets: list[str] | None, skip: int, *, backward: bool) -> list[Call]:
    shape = traced_model(fields, target_modules=targets, n_layers_to_skip_for_backprop=skip)
    work = Workload(shape, tokens=BATCH * SEQ, micro_batch_tokens=BATCH * SEQ, seq_len=SEQ)
    return [(p.key, p.transpose, p.tokens, p.contraction, p.width) for p in work.products(BATCH * SEQ, backward=backward)]


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to False:UserWarning")  # peft corrects it for GPT-2's Conv1D
@pytest.mark.parametrize(("fields", "targets", "skip"), [
    pytest.param(LLAMA, None, 1, id="llama-q-v"),  # peft's default targets: block 0's q|k|v input needs no gradient
    pytest.param(LLAMA, None, 3, id="llama-skip-3"),  # the largest skip the trainer accepts: the same calls
    pytest.param(LLAMA, ["o_proj"], 0, id="llama-o"),  # neither q|k|v's nor o's input needs a gradient
    pytest.param(LLAMA, ["down_proj"], 0, id="llama-down"),  # block 0's gradients start below its MLP
    pytest.param(GPT2, None, 1, id="gpt2-c_attn"),  # Conv1D layers, each alone (c_attn already holds q, k, v)
])
def test_the_simulated_calls_are_the_ones_a_trainer_makes(fields: dict[str, Any], targets: list[str] | None, skip: int) -> None:
    step, evaluation = real_calls(fields, targets, skip)
    assert any(t for _, t, *_ in step) and any("+" in key for key, *_ in step) == (fields is LLAMA)
    assert simulated_calls(fields, targets, skip, backward=True) == step
    assert simulated_calls(fields, targets, skip, backward=False) == evaluation


def test_a_skip_the_trainer_refuses_is_refused_by_the_plan() -> None:
    """Skipping o_proj's backward would drop a gradient LoRA on q and v needs: compile() refuses, so
    the estimate does too, rather than simulate a run that cannot happen."""
    with pytest.raises(BackpropSkipError, match="use at most 3"):
        traced_model(LLAMA, n_layers_to_skip_for_backprop=4)
