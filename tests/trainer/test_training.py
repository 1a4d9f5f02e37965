"""The training loop: accumulation, clipping, checkpoints and resume, adapters, logs, evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel
from trainer_factory import GPT2, LLAMA, base_model, make_trainer, token_data

from cipherswarm.fhe_backend.quant import concat_columns, quantize_weight
from cipherswarm.node.weights import group_members
from cipherswarm.trainer import NotCompiledError, Precision, RemoteLinear, causal_lm_loss


def _lora_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _sgd_trainer(arch, lr: float = 0.5, **kwargs):
    trainer = make_trainer(arch, **kwargs)
    trainer.optimizer = torch.optim.SGD(trainer._trainable, lr=lr)
    return trainer


class TestAccumulation:
    @pytest.mark.parametrize("fhe", ["disable", "simulate"])
    def test_two_micro_batches_equal_one_double_batch(self, fhe: str) -> None:
        """Per-token quantization makes batching irrelevant, so simulate must match too.

        Exactly so for bit-identical inputs: the first step's quantized operands are the same
        integers. Later steps start from parameters that float32 ops on other batch shapes rounded
        differently in the last bit, and on a grid of 2^8 levels such a difference flips a rounding
        now and then: one step of a gradient's grid, about 5e-5 of a LoRA weight here."""
        data = token_data(5, 8)
        coarse = Precision(8, 8, 8)
        operands: dict[str, list[torch.Tensor]] = {}

        def recorded(trainer, name: str):
            if fhe == "simulate":
                local = trainer._local["simulate"]
                product, seen = local.matmul, operands.setdefault(name, [])
                local.matmul = lambda key, x, *, transpose: seen.append(x.clone()) or product(key, x, transpose=transpose)
            return trainer

        # one micro-batch at a time, so that the recorded operands come in order (overlap: TestOverlap)
        accumulated = _sgd_trainer(LLAMA, training_args={"gradient_accumulation_steps": 2}, micro_batches_in_flight=1)
        accumulated.compile(data[:1], precision=coarse)
        recorded(accumulated, "accumulated").train(torch.utils.data.DataLoader(data, batch_size=1), fhe=fhe, progress=False)
        whole = _sgd_trainer(LLAMA)
        whole.compile(data[:1], precision=coarse)
        # the same grouping as an explicit batch sampler: [0, 1], [2, 3], then the short group [4]
        recorded(whole, "whole").train(torch.utils.data.DataLoader(data, batch_sampler=[[0, 1], [2, 3], [4]]), fhe=fhe, progress=False)
        assert [r.tokens for r in accumulated.step_records] == [16, 16, 8]
        assert accumulated.get_training_losses() == pytest.approx(whole.get_training_losses(), rel=1e-5)
        if fhe == "simulate":  # step 1: one call of the double batch is the two micro-batches' calls stacked
            per_step = len(operands["whole"]) // 3
            first = operands["accumulated"][: 2 * per_step]
            assert per_step > 0 and all(torch.equal(torch.cat([a, b]), w) for a, b, w in
                                        zip(first[:per_step], first[per_step:], operands["whole"][:per_step]))
        for name, p in _lora_params(whole.model).items():
            torch.testing.assert_close(_lora_params(accumulated.model)[name], p, rtol=1e-5, atol=2e-4)

    def test_clipping_bounds_the_update(self) -> None:
        data = token_data(1, 8)
        loader = torch.utils.data.DataLoader(data, batch_size=1)
        free = _sgd_trainer(LLAMA, lr=1.0)
        before = _lora_params(free.model)
        free.train(loader, fhe="disable", progress=False)
        step = torch.cat([(p - before[n]).flatten() for n, p in _lora_params(free.model).items()]).norm()
        norm = free.step_records[0].grad_norm
        assert float(step) == pytest.approx(norm, rel=1e-4)  # unclipped: lr * |g|

        clipped = _sgd_trainer(LLAMA, lr=1.0, training_args={"max_grad_norm": norm / 10})
        before = _lora_params(clipped.model)
        clipped.train(loader, fhe="disable", progress=False)
        step = torch.cat([(p - before[n]).flatten() for n, p in _lora_params(clipped.model).items()]).norm()
        assert clipped.step_records[0].grad_norm == pytest.approx(norm, rel=1e-5)  # recorded before clipping
        assert float(step) == pytest.approx(norm / 10, rel=1e-4)


class TestResume:
    """A run stopped at any step and resumed reproduces the uninterrupted losses bit for bit.

    GPT-2 keeps its dropout, the loader shuffles with the global RNG and an LR schedule runs, so
    every piece of state a checkpoint must carry is exercised. 5 micro-batches per epoch with
    accumulation 2 gives steps of 2, 2 and 1 micro-batches.
    """

    def _run(self, tmp_path, fhe: str, arch=GPT2, epochs=2, max_steps=None, resume=False, lora_seed=None):
        trainer = make_trainer(arch, lora_seed=lora_seed, checkpoint_dir=tmp_path / "ckpt",
                               training_args={"gradient_accumulation_steps": 2, "max_grad_norm": 1.0})
        trainer.lr_scheduler = torch.optim.lr_scheduler.StepLR(trainer.optimizer, step_size=2, gamma=0.5)
        data = token_data(5, 8)
        trainer.compile(data[:1])
        loader = torch.utils.data.DataLoader(data, batch_size=1, shuffle=True)
        torch.manual_seed(11)
        trainer.train(loader, num_epochs=epochs, fhe=fhe, max_steps=max_steps, resume_from_checkpoint=resume,
                      progress=False)
        return trainer

    @pytest.mark.parametrize("stop_at", [1, 2, 3, 4])
    def test_resume_reproduces_losses(self, tmp_path, stop_at: int) -> None:
        full = self._run(tmp_path / "full", "simulate")
        assert len(full.get_training_losses()) == 6
        first = self._run(tmp_path / "split", "simulate", max_steps=stop_at)
        assert first.get_training_losses() == full.get_training_losses()[:stop_at]
        # Another LoRA initialisation and a fresh optimizer: everything must come from the checkpoint.
        resumed = self._run(tmp_path / "split", "simulate", resume=True, lora_seed=99)
        assert resumed.get_training_losses() == full.get_training_losses()
        final, expected = _lora_params(resumed.model), _lora_params(full.model)
        assert all(torch.equal(final[n], expected[n]) for n in expected)

    def test_resume_under_encryption_with_fresh_keys(self, tmp_path) -> None:
        full = self._run(tmp_path / "full", "simulate", arch=LLAMA, epochs=1)
        self._run(tmp_path / "split", "execute", arch=LLAMA, epochs=1, max_steps=2)
        resumed = self._run(tmp_path / "split", "execute", arch=LLAMA, epochs=1, resume=True, lora_seed=5)
        assert resumed.get_training_losses() == full.get_training_losses()

    def test_a_checkpoint_of_other_base_weights_is_refused(self, tmp_path) -> None:
        self._run(tmp_path, "simulate", max_steps=2)
        other = make_trainer(GPT2, seed=1, checkpoint_dir=tmp_path / "ckpt",  # other base weights, same shapes
                             training_args={"gradient_accumulation_steps": 2, "max_grad_norm": 1.0})
        other.compile(token_data(1, 8))
        with pytest.raises(ValueError, match="other base weights"):
            other.train(torch.utils.data.DataLoader(token_data(5, 8), batch_size=1), fhe="simulate", resume_from_checkpoint=True,
                        progress=False)

    def test_checkpoint_folder_holds_adapters_and_no_keys(self, tmp_path) -> None:
        trainer = self._run(tmp_path, "simulate", max_steps=2)
        folders = sorted((tmp_path / "ckpt").iterdir())
        assert [f.name for f in folders] == ["checkpoint-000002"]
        names = {p.name for p in folders[0].iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json", "trainer_state.pt"} <= names
        state = torch.load(folders[0] / "trainer_state.pt", weights_only=True)
        assert state["global_step"] == 2 and len(state["records"]) == 2
        # Plain training state only: nothing of the executor (keys, checkers) is ever written.
        assert set(state) == {"format", "global_step", "epoch", "batches_done", "records", "optimizer", "scheduler",
                              "rng_epoch_start", "rng_now", "config", "model_digest"}
        assert trainer.global_step == 2


def test_adapters_round_trip_through_peft(tmp_path) -> None:
    trainer = make_trainer(LLAMA, loss_fn=causal_lm_loss)
    data = token_data(4, 8)
    trainer.compile(data[:1])
    executor = trainer._local["execute"]
    trainer.train(torch.utils.data.DataLoader(data, batch_size=2), fhe="simulate", progress=False)
    trained = _lora_params(trainer.model)
    trainer.save_and_clear_private_info(tmp_path / "adapters")

    assert not any(isinstance(m, RemoteLinear) for m in trainer.model.modules())
    with pytest.raises(NotCompiledError, match="keys were cleared"):
        executor.matmul("model.layers.0.self_attn.o_proj", torch.zeros(1, 64, dtype=torch.int64), transpose=False)
    with pytest.raises(NotCompiledError, match="compile"):
        trainer.train([data], fhe="execute", progress=False)

    loaded = PeftModel.from_pretrained(base_model(LLAMA), tmp_path / "adapters")
    loaded_lora = {n: p for n, p in loaded.named_parameters() if "lora_" in n}
    assert loaded_lora.keys() == trained.keys()
    assert all(torch.equal(loaded_lora[n], trained[n]) for n in trained)
    trainer.model.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.equal(trainer.model(input_ids=data).logits, loaded(input_ids=data).logits)

    trainer.compile(data[:1])  # a new compile brings fresh keys: training works again
    trainer.train([data[:1]], fhe="execute", progress=False)


def test_layer_specs_name_the_hf_weights(arch) -> None:
    """A provider holding the plain HF checkpoint finds "<key>.weight" and quantizes it the same way."""
    trainer = make_trainer(arch)
    state = base_model(arch).state_dict()
    trainer.compile(token_data(1, 8))
    specs = trainer.layer_specs()
    keys = [k for key in specs for k in group_members(key)]
    assert len(keys) == len(set(keys)) == arch.remote_layers and "lm_head" not in keys
    for key, spec in specs.items():  # a group's weights are its members' side by side (q|k|v, gate|up)
        expected = concat_columns([quantize_weight(state[f"{k}.weight"] if arch is GPT2 else state[f"{k}.weight"].t())
                                   for k in group_members(key)])
        assert torch.equal(spec.weight.q, expected.q) and spec.weight.digest == expected.digest
    assert sum(len(group_members(k)) for k, s in specs.items() if not s.backward) == arch.skip


def test_remote_lm_head(arch) -> None:
    trainer = make_trainer(arch, remote_lm_head=True)
    data = token_data(2, 8)
    trainer.compile(data[:1])
    assert trainer.layer_specs()["lm_head"].backward
    trainer.train(torch.utils.data.DataLoader(data, batch_size=1), fhe="simulate", progress=False)
    assert len(trainer.get_training_losses()) == 2


def test_log_eval_and_progress(tmp_path, capsys) -> None:
    data = token_data(4, 8)
    log = tmp_path / "train.log"
    seen = []

    def metric(model, loader):
        seen.append(model.training)
        return {"batches": float(len(loader))}

    trainer = make_trainer(LLAMA, train_log_path=log, logging_steps=2, eval_steps=2,
                           eval_loader=torch.utils.data.DataLoader(data[:2], batch_size=1), eval_metric_fn=metric)
    trainer.compile(data[:1])
    trainer.train(torch.utils.data.DataLoader(data, batch_size=1), fhe="execute", progress=True)
    entries = [json.loads(line) for line in log.read_text().splitlines()]
    assert [e["event"] for e in entries] == ["compile", "train", "step", "step"]
    steps = [e for e in entries if e["event"] == "step"]
    assert [e["step"] for e in steps] == [2, 4]
    assert all(e["eval"]["batches"] == 2.0 and e["eval"]["eval_loss"] > 0 for e in steps)
    assert all(e["bytes_sent"] > 0 and e["cpu_encrypt_s"] > 0 and e["cpu_plain_s"] > 0 for e in steps)
    assert seen == [False, False]  # metrics are computed in eval mode
    assert trainer.model.training
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "sent=" in err and "tok_s=" in err


def test_attention_mask_and_padding() -> None:
    """Masks reach the model, padded positions are neither learned from nor counted as tokens."""
    trainer = make_trainer(LLAMA)
    ids = token_data(2, 8)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    trainer.compile({"input_ids": ids, "attention_mask": mask})
    with torch.no_grad(), trainer.fhe_mode("simulate"):
        expected = float(trainer.model(input_ids=ids, attention_mask=mask, labels=labels).loss)
    trainer.train([{"input_ids": ids, "attention_mask": mask}], fhe="simulate", progress=False)
    assert trainer.step_records[0].tokens == 13
    assert trainer.get_training_losses() == [expected]
