"""Your own training loop: Hugging Face's ``Trainer`` fine-tunes the bundled tiny LLaMA with LoRA
while every frozen base layer runs encrypted.

One call does it: ``remote_base_layers(model, inputset, fhe="execute")`` compiles the model's base
layers on a batch (parameters, keys, accuracy check) and switches them to the mode; from then on
every forward and ``loss.backward()`` of the model - here, inside ``transformers.Trainer`` -
encrypts each base layer's input, has an in-process provider multiply it, decrypts and checks the
result. With the swarm, the same call takes the node client::

    with SwarmClient(model_dir=..., bootstrap=[...]) as client:
        remote_base_layers(model, batch, fhe="remote", executor=client)
        Trainer(model=model, ...).train()

    python examples/hf_trainer.py [--steps 4] [--fhe execute|simulate|disable] [--out adapters/]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments, default_data_collator
from transformers.trainer_callback import PrinterCallback
from transformers.utils import logging as hf_logging

from cipherswarm.trainer import remote_base_layers
from cipherswarm.trainer.data import load_examples
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL


class Rows(torch.utils.data.Dataset):
    """The examples of ``load_examples`` (a batch of every example) one row at a time, as HF Trainer reads them."""

    def __init__(self, batch: dict[str, torch.Tensor]) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return len(self.batch["input_ids"])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.batch.items()}


class PrintLosses(TrainerCallback):
    """One line per optimizer step: its loss, and what its encrypted products cost."""

    def __init__(self, remote) -> None:  # type: ignore[no-untyped-def]
        self.remote = remote
        self.start, self.before = time.perf_counter(), remote.statistics()

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self.start, self.before = time.perf_counter(), self.remote.statistics()

    def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
        if logs and "loss" in logs:
            spent = self.remote.statistics() - self.before  # cumulative statistics: this step's share
            print(f"step {state.global_step}: loss {logs['loss']:.4f}  ({spent.calls} products, "
                  f"{spent.bytes_sent / 1e6:.1f} MB sent, {time.perf_counter() - self.start:.1f} s)", flush=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=4, help="optimizer steps")
    ap.add_argument("--fhe", default="execute", choices=["execute", "simulate", "disable"])
    ap.add_argument("--batch-size", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--out", default=None, help="save the LoRA adapters here (peft save_pretrained)")
    args = ap.parse_args()
    torch.manual_seed(0)
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)

    # 1. the model and the data, as anywhere else: an HF causal LM under peft LoRA, tokenized text
    tokenizer = AutoTokenizer.from_pretrained(BUNDLED_MODEL)
    tokenizer.model_max_length = 1 << 30  # the whole file is tokenized at once, then cut into sequences
    model = AutoModelForCausalLM.from_pretrained(BUNDLED_MODEL, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                             task_type="CAUSAL_LM"))
    train, valid = load_examples(BUNDLED_DATA, tokenizer, args.seq_len)

    # 2. the one call: every frozen base layer now runs encrypted (fhe="execute"), forward and backward
    inputset = {k: v[: args.batch_size] for k, v in train.items()}
    remote = remote_base_layers(model, inputset, fhe=args.fhe)
    print(f"{remote}; quantized vs float on the inputset: {remote.accuracy}")

    # 3. Hugging Face's Trainer, unchanged: CPU, no network, no reporting
    training_args = TrainingArguments(
        output_dir="runs/example-hf-trainer", max_steps=args.steps, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, learning_rate=args.lr, lr_scheduler_type="constant",
        logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
        dataloader_pin_memory=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=Rows(train),
                      eval_dataset=Rows({k: v[: args.batch_size] for k, v in valid.items()}),
                      data_collator=default_data_collator, callbacks=[PrintLosses(remote)])
    trainer.remove_callback(PrinterCallback)  # our lines instead of its dicts
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    print(f"losses ({args.fhe}): {[round(x, 4) for x in losses]}")
    print(f"held-out loss ({args.fhe}): {before:.4f} -> {after:.4f}")

    # 4. the adapters are a plain peft checkpoint; then every key is forgotten
    if args.out:
        model.save_pretrained(args.out)
        print(f"adapters saved to {args.out}")
    remote.clear_private_info()
    return 0


if __name__ == "__main__":
    sys.exit(main())
