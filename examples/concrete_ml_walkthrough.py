"""Concrete ML's LoRA fine-tuning example, step for step, on cipherswarm's LoraTrainer.

Concrete ML 1.8 introduced::

    lora_trainer = LoraTrainer(model=peft_model, optimizer=optimizer, loss_fn=causal_lm_loss,
                               lr_scheduler=lr_scheduler, training_args=training_args_dict,
                               n_layers_to_skip_for_backprop=3)
    lora_trainer.compile(inputset, n_bits=16)
    lora_trainer.train(dataloader, num_epochs=EPOCHS, fhe="execute", device=device)

The same calls run here on the bundled tiny LLaMA (offline), with 16-bit activations, and the
extras that Concrete ML lacks: simulate is bit-identical to execute, and training resumes where it
stopped.

    python examples/concrete_ml_walkthrough.py [--steps 3]
"""

from __future__ import annotations

import argparse
import sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from cipherswarm.trainer import LoraTrainer, causal_lm_loss
from cipherswarm.trainer.data import load_examples
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--checkpoints", default="runs/walkthrough/checkpoints")
    args = ap.parse_args()
    torch.manual_seed(0)

    # 1. a Hugging Face causal LM with LoRA adapters (peft), as in Concrete ML's notebook
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    tokenizer.model_max_length = 1 << 30
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0,
                                                  target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    peft_model.print_trainable_parameters()

    # 2. data: 128-token sequences, 16 per micro-batch (2048 tokens fill one encrypted block)
    seqs = load_examples(BUNDLED_DATA, tokenizer, 128)[0]["input_ids"]  # training examples, token ids
    dataloader = torch.utils.data.DataLoader(seqs[: 16 * args.steps], batch_size=16, shuffle=True)
    inputset = next(iter(dataloader))

    # 3. the trainer: the same arguments as Concrete ML's
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=3e-3)
    lr_scheduler = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1.0, end_factor=0.5, total_iters=args.steps)
    lora_trainer = LoraTrainer(model=peft_model, optimizer=optimizer, loss_fn=causal_lm_loss, lr_scheduler=lr_scheduler,
                               training_args={"gradient_accumulation_steps": 1, "max_grad_norm": 1.0},
                               n_layers_to_skip_for_backprop=3, train_log_path=None, checkpoint_dir=args.checkpoints)

    # 4. compile: parameters per layer from the quantized weights and 16-bit activations; keys stay here
    lora_trainer.compile(inputset, n_bits=16)

    # 5. the simulation matches the encrypted computation exactly, so check on one batch first
    with torch.no_grad(), lora_trainer.fhe_mode("simulate"):
        simulated = peft_model(input_ids=inputset).logits
    with torch.no_grad(), lora_trainer.fhe_mode("execute"):
        encrypted = peft_model(input_ids=inputset).logits
    print(f"simulate == execute on a batch: {torch.equal(simulated, encrypted)}")

    # 6. train under encryption (products by an in-process provider, every one verified)
    lora_trainer.train(dataloader, num_epochs=1, fhe="execute", device="cpu")
    print("losses:", [round(x, 4) for x in lora_trainer.get_training_losses()])
    lora_trainer.save_and_clear_private_info("runs/walkthrough/adapter")
    return 0


if __name__ == "__main__":
    sys.exit(main())
