"""Bad inputs and wrong call orders fail early, with a message that says what to do."""

from __future__ import annotations

import pytest
import torch
from peft import IA3Config, get_peft_model
from trainer_factory import GPT2, LLAMA, base_model, make_trainer, token_data

from cipherswarm.trainer import BackpropSkipError, LoraTrainer, NoLoraLayersError, NotCompiledError


@pytest.fixture(scope="module")
def compiled() -> LoraTrainer:
    trainer = make_trainer(LLAMA)
    trainer.compile(token_data(1, 8))
    return trainer


class TestModel:
    def test_plain_model_is_refused(self) -> None:
        model = base_model(LLAMA)
        with pytest.raises(TypeError, match="peft.get_peft_model"):
            LoraTrainer(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))

    def test_peft_model_without_lora(self) -> None:
        model = get_peft_model(base_model(LLAMA), IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                                            feedforward_modules=["down_proj"]))
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with pytest.raises(NoLoraLayersError, match="no LoRA layer"):
            LoraTrainer(model=model, optimizer=opt)

    @pytest.mark.parametrize(("arch", "skip", "layer", "max_skip"), [
        (GPT2, 2, "transformer.h.0.attn.c_proj", 1),
        (LLAMA, 4, "model.layers.0.self_attn.o_proj", 3),
    ], ids=["gpt2", "llama"])
    def test_skipping_a_needed_backward(self, arch, skip: int, layer: str, max_skip: int) -> None:
        trainer = make_trainer(arch, n_layers_to_skip_for_backprop=skip)
        with pytest.raises(BackpropSkipError, match=f"use at most {max_skip}") as info:
            trainer.compile(token_data(1, 8))
        assert (info.value.layer, info.value.max_skip) == (layer, max_skip)


class TestArguments:
    @pytest.mark.parametrize("n_bits", [1, 17, 0, 8.0, True, "8"])
    def test_n_bits_out_of_range(self, n_bits) -> None:
        with pytest.raises(ValueError, match=r"n_bits must be an int in \[2, 16\]"):
            make_trainer(LLAMA).compile(token_data(1, 8), n_bits=n_bits)

    @pytest.mark.parametrize("args", [{"gradient_accumulation_step": 2}, {"gradient_accumulation_steps": 0},
                                      {"max_grad_norm": -1.0}, {"max_grad_norm": float("nan")}])
    def test_training_args(self, args) -> None:
        with pytest.raises(ValueError, match="training_args|gradient_accumulation_steps|max_grad_norm"):
            make_trainer(LLAMA, training_args=args)

    @pytest.mark.parametrize("name", ["logging_steps", "eval_steps", "save_steps"])
    def test_step_counts(self, name: str) -> None:
        with pytest.raises(ValueError, match=f"{name} must be an int >= 1"):
            make_trainer(LLAMA, **{name: 0})

    def test_unknown_fhe_mode(self, compiled: LoraTrainer) -> None:
        with pytest.raises(ValueError, match="fhe must be one of"):
            compiled.train([token_data(1, 8)], fhe="fhe", progress=False)

    @pytest.mark.parametrize("fhe", ["simulate", "execute", "remote"])
    def test_train_before_compile(self, fhe: str) -> None:
        with pytest.raises(NotCompiledError, match=r"call compile\(inputset\)"):
            make_trainer(LLAMA).train([token_data(1, 8)], fhe=fhe, progress=False)

    def test_disable_needs_no_compile(self) -> None:
        trainer = make_trainer(LLAMA)
        trainer.train([token_data(1, 8)], fhe="disable", progress=False)
        assert len(trainer.get_training_losses()) == 1

    def test_layer_specs_before_compile(self) -> None:
        with pytest.raises(NotCompiledError):
            make_trainer(LLAMA).layer_specs()

    def test_remote_needs_an_executor(self, compiled: LoraTrainer) -> None:
        with pytest.raises(ValueError, match="needs an executor"):
            compiled.train([token_data(1, 8)], fhe="remote", progress=False)
        with pytest.raises(TypeError, match="no matmul"):
            compiled.train([token_data(1, 8)], fhe="remote", executor=object(), progress=False)

    @pytest.mark.parametrize("reply", [lambda x, w: (x @ w).float(), lambda x, w: (x @ w)[:, :-1], lambda x, w: None])
    def test_an_executor_with_wrong_replies(self, compiled: LoraTrainer, reply) -> None:
        class Wrong:
            def matmul(self, layer_key, x_int, *, transpose):
                w = specs[layer_key].weight.q.to(torch.int64)
                return reply(x_int.long(), w.t() if transpose else w)

        specs = compiled.layer_specs()
        with pytest.raises(TypeError, match=r"Wrong.matmul\('model.layers.0.self_attn.q_proj\+model.layers.0.self_attn.k_proj\+model.layers.0.self_attn.v_proj', transpose=False\) must return"):
            compiled.train([token_data(1, 8)], fhe="remote", executor=Wrong(), progress=False)

    def test_resume_without_a_checkpoint(self, compiled: LoraTrainer, tmp_path) -> None:
        with pytest.raises(ValueError, match="needs checkpoint_dir"):
            compiled.train([token_data(1, 8)], fhe="simulate", resume_from_checkpoint=True, progress=False)
        compiled.checkpoint_dir = tmp_path
        try:
            with pytest.raises(FileNotFoundError, match="no checkpoint"):
                compiled.train([token_data(1, 8)], fhe="simulate", resume_from_checkpoint=True, progress=False)
        finally:
            compiled.checkpoint_dir = None


class TestBatches:
    def test_attention_mask_values(self, compiled: LoraTrainer) -> None:
        ids = token_data(1, 8)
        mask = torch.ones_like(ids)
        mask[0, 3] = 2
        with pytest.raises(ValueError, match=r"attention_mask must hold only 0 and 1 .* \[2\]"):
            compiled.train([{"input_ids": ids, "attention_mask": mask}], fhe="simulate", progress=False)

    def test_attention_mask_shape(self, compiled: LoraTrainer) -> None:
        ids = token_data(1, 8)
        with pytest.raises(ValueError, match="attention_mask shape"):
            compiled.train([{"input_ids": ids, "attention_mask": torch.ones(1, 7)}], fhe="simulate", progress=False)

    @pytest.mark.parametrize("batch", [token_data(1, 8)[0], {"ids": token_data(1, 8)}, 3, (token_data(1, 8),)])
    def test_malformed_batches(self, compiled: LoraTrainer, batch) -> None:
        with pytest.raises((TypeError, ValueError), match="input_ids|batch"):
            compiled.train([batch], fhe="simulate", progress=False)

    def test_empty_inputset(self) -> None:
        with pytest.raises(ValueError, match="inputset"):
            make_trainer(LLAMA).compile([])
