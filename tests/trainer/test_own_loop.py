"""Your own training loop: ``remote_base_layers`` makes a peft model's base layers remote for any
loop, HF ``Trainer`` or plain torch, with the losses of ``LoraTrainer`` exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments, default_data_collator
from caps import time_limit
from trainer_factory import LLAMA, make_trainer, peft_model, provider_process, token_data

from cipherswarm.trainer import (
    LocalExecutor, NotCompiledError, RemoteBaseLayers, RemoteLinear, causal_lm_loss, remote_base_layers,
)

ROOT = Path(__file__).resolve().parents[2]
LR = 1e-2
STEPS, BATCH, TOKENS = 3, 2, 8


def _rows(padded: bool = True) -> list[dict[str, torch.Tensor]]:
    """STEPS * BATCH sequences as dataset rows; with ``padded``, the last three tokens of the second
    row are padding (mask 0, no loss), so that the loss's normalisation is put to the test."""
    rows = []
    for i, ids in enumerate(token_data(STEPS * BATCH, TOKENS)):
        mask, labels = torch.ones_like(ids), ids.clone()
        if padded and i == 1:
            mask[-3:], labels[-3:] = 0, -100
        rows.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return rows


def _loader(rows: list[dict[str, torch.Tensor]], batch: int = BATCH) -> torch.utils.data.DataLoader:
    """The batches HF Trainer makes of ``rows`` with a sequential sampler, in that order."""
    return torch.utils.data.DataLoader(rows, batch_size=batch, collate_fn=default_data_collator)


def _lora_trainer_run(fhe: str, rows, ga: int = 1, **kwargs):
    """The reference: LoraTrainer, AdamW (LR), no scheduler, clipping at 1.0, ``ga`` micro-batches per step."""
    trainer = make_trainer(LLAMA, lr=LR, training_args={"gradient_accumulation_steps": ga, "max_grad_norm": 1.0}, **kwargs)
    trainer.compile(_loader(rows))
    trainer.train(_loader(rows, BATCH // ga if ga > 1 else BATCH), fhe=fhe, progress=False)
    return trainer.get_training_losses(), [r.grad_norm for r in trainer.step_records], _lora(trainer.model)


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _hf_trainer_run(fhe: str, rows, tmp_path: Path, ga: int = 1, executor=None, **trainer_kwargs):
    """The same model, data order, optimizer and clipping through transformers.Trainer."""
    model = peft_model(LLAMA)
    remote = remote_base_layers(model, _loader(rows), fhe=fhe, executor=executor, n_layers_to_skip_for_backprop=LLAMA.skip)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), per_device_train_batch_size=BATCH // ga, gradient_accumulation_steps=ga,
        num_train_epochs=1, learning_rate=LR, lr_scheduler_type="constant", max_grad_norm=1.0,
        train_sampling_strategy="sequential",  # the rows in order, as LoraTrainer's loader gives them
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=default_data_collator,
                      optimizers=(optimizer, None), **trainer_kwargs)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    return [h["loss"] for h in logs], [h["grad_norm"] for h in logs], _lora(model), remote


def test_hf_trainer_execute_gives_lora_trainer_losses(tmp_path: Path) -> None:
    """HF Trainer, base layers encrypted (fhe="execute"), against LoraTrainer with the same seed,
    batches, AdamW and clipping: losses, gradient norms and LoRA weights equal bit for bit.

    HF Trainer's own loss (the model's, given ``labels``) is the sum over the batch's target tokens
    divided by their number (``num_items_in_batch``); LoraTrainer's ``causal_lm_loss`` is the mean
    over the same tokens: the same float, padding included, with one micro-batch per step."""
    rows = _rows()
    reference = _lora_trainer_run("execute", rows, loss_fn=causal_lm_loss)
    losses, norms, weights, remote = _hf_trainer_run("execute", rows, tmp_path)
    assert len(losses) == STEPS
    assert losses == reference[0]
    assert norms == reference[1]
    assert weights.keys() == reference[2].keys()
    assert all(torch.equal(w, reference[2][n]) for n, w in weights.items())
    stats = remote.statistics()
    assert remote.fhe == "execute" and stats.calls > 0 and stats.bytes_sent > 0 and stats.encrypt_s > 0


def test_hf_trainer_with_a_loss_function_and_accumulation(tmp_path: Path) -> None:
    """``compute_loss_func=causal_lm_loss`` gives LoraTrainer's losses exactly too. With gradient
    accumulation the two normalise differently: HF Trainer divides the accumulated batch's summed
    loss by all its target tokens, LoraTrainer averages the micro-batches' mean losses. Without
    padding that is the same number up to float rounding (here within 1e-6 relative)."""
    rows = _rows()
    reference = _lora_trainer_run("simulate", rows, loss_fn=causal_lm_loss)

    def loss_func(outputs, labels, num_items_in_batch=None):  # one micro-batch per step: its mean is the step's
        return causal_lm_loss(outputs.logits, labels)

    losses, norms, weights, _ = _hf_trainer_run("simulate", rows, tmp_path, compute_loss_func=loss_func)
    assert losses == reference[0] and norms == reference[1]
    assert all(torch.equal(w, reference[2][n]) for n, w in weights.items())

    unpadded = _rows(padded=False)
    reference = _lora_trainer_run("simulate", unpadded, ga=2, loss_fn=causal_lm_loss, micro_batches_in_flight=1)
    losses, _, _, _ = _hf_trainer_run("simulate", unpadded, tmp_path, ga=2)
    assert losses == pytest.approx(reference[0], rel=1e-6, abs=0)


def test_plain_torch_loop_simulate_gives_lora_trainer_losses() -> None:
    """A hand-written loop (forward, backward, clip, AdamW step) in fhe="simulate"."""
    rows = _rows()
    reference = _lora_trainer_run("simulate", rows, loss_fn=causal_lm_loss)
    model = peft_model(LLAMA)
    remote = remote_base_layers(model, _loader(rows), fhe="simulate", n_layers_to_skip_for_backprop=LLAMA.skip)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LR)
    losses, norms = [], []
    model.train()
    for batch in _loader(rows):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = causal_lm_loss(out.logits, batch["labels"])
        loss.backward()
        norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
    assert losses == reference[0] and norms == reference[1]
    assert all(torch.equal(w, reference[2][n]) for n, w in _lora(model).items())
    assert remote.statistics().calls > 0


def test_modes_switch_and_come_back() -> None:
    """``mode`` switches at once; as a context manager it switches back. simulate, execute and
    remote (an executor over the wire format) give the same logits; disable gives the float model's."""
    model = peft_model(LLAMA)
    batch = token_data(2, 8)
    with torch.no_grad():
        float_logits = model(input_ids=batch).logits
    remote = remote_base_layers(model, batch, fhe="simulate", n_layers_to_skip_for_backprop=LLAMA.skip)
    assert sum(isinstance(m, RemoteLinear) for m in model.modules()) == LLAMA.remote_layers
    assert remote.accuracy is not None and remote.accuracy.tokens == batch.numel()
    logits = {}
    with torch.no_grad():
        logits["simulate"] = model(input_ids=batch).logits
        with remote.mode("execute") as executor:
            assert remote.fhe == "execute" and executor is remote.local_executors["execute"]
            logits["execute"] = model(input_ids=batch).logits
        assert remote.fhe == "simulate"
        wire = LocalExecutor(remote.layer_specs(), wire=True)
        with remote.mode("remote", executor=wire):
            logits["remote"] = model(input_ids=batch).logits
        assert wire.statistics().calls > 0
        remote.mode("disable")  # for good
        logits["disable"] = model(input_ids=batch).logits
    assert remote.fhe == "disable"
    assert torch.equal(logits["simulate"], logits["execute"]) and torch.equal(logits["simulate"], logits["remote"])
    assert torch.equal(logits["disable"], float_logits) and not torch.equal(logits["simulate"], float_logits)


def test_lora_trainer_compiles_through_remote_base_layers() -> None:
    """One source of truth: the trainer's base layers are a RemoteBaseLayers, its modes theirs."""
    trainer = make_trainer(LLAMA)
    trainer.compile(token_data(1, 8))
    assert isinstance(trainer.remote, RemoteBaseLayers) and trainer.remote.compiled
    assert trainer.layer_specs().keys() == trainer.remote.layer_specs().keys()
    with trainer.fhe_mode("execute"):
        assert trainer.remote.fhe == "execute"
    assert trainer.remote.fhe == "disable"


def test_clear_private_info_gives_the_float_model_back() -> None:
    model = peft_model(LLAMA)
    batch = token_data(1, 8)
    remote = remote_base_layers(model, batch, fhe="execute", n_layers_to_skip_for_backprop=LLAMA.skip)
    executor = remote.local_executors["execute"]
    remote.clear_private_info()
    assert not any(isinstance(m, RemoteLinear) for m in model.modules())
    assert remote.fhe == "disable" and not remote.compiled
    with pytest.raises(NotCompiledError, match="keys were cleared"):
        executor.matmul("model.layers.0.self_attn.o_proj", torch.zeros(1, 64, dtype=torch.int64), transpose=False)
    with pytest.raises(NotCompiledError, match=r"compile\(inputset\) before using fhe='execute'"):
        remote.mode("execute")
    model(input_ids=batch)  # a plain model again


class TestErrors:
    def test_an_encrypted_mode_before_compile(self) -> None:
        model = peft_model(LLAMA)
        remote = RemoteBaseLayers(model)
        for fhe in ("simulate", "execute", "remote"):
            with pytest.raises(NotCompiledError, match=rf"call compile\(inputset\) before using fhe='{fhe}'"):
                remote.mode(fhe)
        with pytest.raises(NotCompiledError, match="compile"):
            remote.layer_specs()
        assert remote.fhe == "disable" and not any(isinstance(m, RemoteLinear) for m in model.modules())

    def test_remote_without_an_executor(self) -> None:
        model = peft_model(LLAMA)
        with pytest.raises(ValueError, match="fhe='remote' needs an executor"):
            remote_base_layers(model, token_data(1, 8), fhe="remote")
        assert not any(isinstance(m, RemoteLinear) for m in model.modules())  # refused before compiling
        remote = remote_base_layers(model, token_data(1, 8), fhe="simulate", n_layers_to_skip_for_backprop=LLAMA.skip)
        with pytest.raises(ValueError, match="fhe='remote' needs an executor"):
            remote.mode("remote")
        with pytest.raises(TypeError, match="no matmul"):
            remote.mode("remote", executor=object())
        assert remote.fhe == "simulate"  # a refused switch changes nothing

    def test_unknown_mode_and_bad_arguments(self) -> None:
        model = peft_model(LLAMA)
        with pytest.raises(ValueError, match="fhe must be one of"):
            remote_base_layers(model, token_data(1, 8), fhe="encrypted")
        with pytest.raises(ValueError, match="n_layers_to_skip_for_backprop"):
            remote_base_layers(model, token_data(1, 8), n_layers_to_skip_for_backprop=-1)
        with pytest.raises(TypeError, match="torch.nn.Module"):
            RemoteBaseLayers("model")  # type: ignore[arg-type]


def test_hf_trainer_example_runs() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "hf_trainer.py"), "--steps", "2"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "step 1: loss" in proc.stdout and "step 2: loss" in proc.stdout
    assert "losses (execute): [" in proc.stdout and "held-out loss (execute)" in proc.stdout


@pytest.mark.slow
def test_hf_trainer_through_the_swarm_equals_simulate(tmp_path: Path) -> None:
    """fhe="remote" with the node client and a provider process on loopback (slow: libp2p, a process)."""
    from cipherswarm.node import SwarmClient

    with time_limit(22), provider_process(tmp_path) as (model_dir, addr):  # 9-11 s measured on 2 busy cores
        rows = _rows()
        simulate = _hf_trainer_run("simulate", rows, tmp_path)
        with SwarmClient(model_dir=model_dir, bootstrap=[addr], ledger=tmp_path / "client.sqlite") as client:
            remote = _hf_trainer_run("remote", rows, tmp_path, executor=client)
            assert remote[3].statistics().bytes_sent > 0
        assert remote[0] == simulate[0] and remote[1] == simulate[1]

