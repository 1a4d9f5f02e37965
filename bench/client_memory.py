"""What a client holds to fine-tune a model it does not hold: memory against the checkpoint's size.

    .venv/bin/python bench/client_memory.py              # TinyLlama-1.1B shapes, bf16, written once to --cache
    .venv/bin/python bench/client_memory.py --quick      # a small model instead: a smoke run of every part

(a) RSS after the client has loaded the model for remote training (summaries, the thin model under
    LoRA, compiled) and prepared every layer's keys and Freivalds sketches, beyond a process that
    has only imported the client's modules (torch, transformers, libp2p: code, not model state),
    as a fraction of the checkpoint's bytes. Must be <= 0.25, goal <= 0.15.
(b) Bytes of client-held state per remote base weight (layer summaries, sketches, keys). Must be
    <= 0.5, goal <= 0.05.
(c) One remote training step of a smaller model through one local provider process: the client's
    peak RSS split into model state (after loading and preparing) and the step's activations.

Each part runs in a fresh process, so that one part's memory cannot hide in another's. The
checkpoint is random-init (the shapes are what matter), written tensor by tensor, never built in
memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
TINYLLAMA = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
SMALL = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)
SHARD_BYTES = 1 << 30


def write_checkpoint(folder: Path, sizes: dict, dtype: torch.dtype = torch.bfloat16) -> int:
    """A random-init LLaMA of ``sizes`` saved as ``dtype`` safetensors shards, one tensor generated at
    a time (the model is never built in memory); returns the checkpoint's bytes."""
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**sizes, dtype=str(dtype).removeprefix("torch."))
    with init_empty_weights():
        skeleton = LlamaForCausalLM(config)
    folder.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(folder)
    gen = torch.Generator().manual_seed(0)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    total = shard_bytes = 0

    def flush() -> None:
        nonlocal shard, shard_bytes
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
        shard, shard_bytes = {}, 0

    for name, p in skeleton.state_dict().items():
        if "norm" in name:
            t = torch.ones(p.shape, dtype=dtype)
        else:
            t = (torch.randn(p.shape, generator=gen) * 0.02).to(dtype)
        shard[name] = t
        shard_bytes += t.nbytes
        total += t.nbytes
        if shard_bytes >= SHARD_BYTES:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


def _rss() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _client_imports() -> None:
    """Everything the client's code imports, before any model: the baseline of (a) and (c)."""
    import transformers.models.llama.modeling_llama  # noqa: F401

    import cipherswarm.node.client  # noqa: F401
    import cipherswarm.trainer.finetune  # noqa: F401
    from cipherswarm.fhe_backend.allocator import retain_freed_memory

    retain_freed_memory()  # the cipherswarm command's allocator policy


def _thin_trainer(model_dir: Path, weights):  # type: ignore[no-untyped-def]
    from peft import LoraConfig, get_peft_model

    from cipherswarm.trainer import LoraTrainer, causal_lm_loss
    from cipherswarm.trainer.thin import load_remote_model

    model, _ = load_remote_model(model_dir, weights)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
    opt = torch.optim.AdamW([p for p in peft.parameters() if p.requires_grad], lr=1e-3)
    trainer = LoraTrainer(model=peft, optimizer=opt, loss_fn=causal_lm_loss, n_layers_to_skip_for_backprop=1,
                          train_log_path=None)
    trainer.compile(torch.randint(0, 1000, (1, 16)), n_bits=8)
    return trainer


def measure_state(model_dir: str) -> dict:
    """(a) and (b), in this process."""
    import gc

    _client_imports()
    base = _rss()
    from cipherswarm.fhe_backend.allocator import release_free_memory
    from cipherswarm.node.client.keys import KeyRing
    from cipherswarm.node.weights import load_model

    weights = load_model(model_dir, hold=False)
    trainer = _thin_trainer(Path(model_dir), weights)
    ring = KeyRing(weights)  # what SwarmClient(prepare=True) opens at start
    ring.prepare([(name, t) for name in weights.layers for t in (False, True)])
    gc.collect()
    release_free_memory()
    remote = sum(layer.shape.d_in * layer.shape.d_out for layer in weights.layers.values())
    assert trainer.compiled
    return {"import_rss": base, "growth": _rss() - base, "peak_growth": _peak_rss() - base, "remote_weights": remote,
            "summaries": weights.summary_bytes(), "secrets": ring.state_bytes()}


def measure_step(model_dir: str, addr: str, tokens: int) -> dict:
    """(c), in this process: state after loading and preparing, then the peak during one step."""
    import gc

    _client_imports()
    base = _rss()
    from cipherswarm.node import SwarmClient
    from cipherswarm.node.weights import load_model

    weights = load_model(model_dir, hold=False)
    with tempfile.TemporaryDirectory() as tmp, SwarmClient(model_dir=model_dir, weights=weights, bootstrap=[addr],
                                                           ledger=Path(tmp) / "client.sqlite") as client:
        trainer = _thin_trainer(Path(model_dir), weights)
        gc.collect()
        state = _rss() - base
        data = torch.randint(0, 32000, (1, tokens), generator=torch.Generator().manual_seed(1))
        peak_before = _peak_rss()
        trainer.train([data], fhe="remote", executor=client, progress=False)
        record = trainer.step_records[-1]
    return {"state": state, "peak": _peak_rss() - base, "peak_before_step": peak_before - base,
            "remote_calls": record.remote_calls, "tokens": tokens}


def _child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=REPO, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cipherswarm-bench",
                   help="where the random checkpoints are written once and reused (default: %(default)s)")
    p.add_argument("--quick", action="store_true", help="the small model for every part (a smoke run)")
    p.add_argument("--tokens", type=int, default=512, help="tokens of the training step in (c) (default 512)")
    p.add_argument("--measure-state", metavar="DIR", help=argparse.SUPPRESS)
    p.add_argument("--measure-step", nargs=2, metavar=("DIR", "ADDR"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.measure_state:
        print(json.dumps(measure_state(args.measure_state)))
        return
    if args.measure_step:
        print(json.dumps(measure_step(*args.measure_step, tokens=args.tokens)))
        return

    big_sizes, big_name = (SMALL, "small") if args.quick else (TINYLLAMA, "tinyllama-1.1b")
    folders = {}
    for name, sizes in ((big_name, big_sizes), ("small", SMALL)):
        folder = args.cache / f"{name}-bf16"
        if not (folder / "model.safetensors.index.json").exists():
            print(f"writing {folder} (random init, bf16, tensor by tensor) ...", flush=True)
            write_checkpoint(folder, sizes)
        folders[name] = folder
    ckpt = sum(f.stat().st_size for f in folders[big_name].glob("*.safetensors"))

    s = _child("--measure-state", str(folders[big_name]))
    frac = s["growth"] / ckpt
    per_weight = (s["summaries"] + s["secrets"]) / s["remote_weights"]
    print(f"model: {big_name}, checkpoint {_mb(ckpt)}, {s['remote_weights'] / 1e6:,.0f} M remote base weights")
    print(f"  imports alone (torch, transformers, libp2p; the baseline): {_mb(s['import_rss'])} RSS")
    print(f"(a) RSS after load + prepare, beyond the baseline: {_mb(s['growth'])} = {frac:.3f} of the checkpoint  "
          f"(must <= 0.25: {'met' if frac <= 0.25 else 'NOT met'}; goal <= 0.15: {'met' if frac <= 0.15 else 'NOT met'})")
    print(f"    peak during load + prepare, beyond the baseline: {_mb(s['peak_growth'])} = {s['peak_growth'] / ckpt:.3f}")
    print(f"(b) client-held state per remote base weight: {per_weight:.4f} B  (summaries {_mb(s['summaries'])}, "
          f"sketches and keys {_mb(s['secrets'])}; must <= 0.5: {'met' if per_weight <= 0.5 else 'NOT met'}; "
          f"goal <= 0.05: {'met' if per_weight <= 0.05 else 'NOT met'})")

    from common import LoopbackSwarm

    with tempfile.TemporaryDirectory(prefix="cipherswarm-bench-") as run_dir, LoopbackSwarm(folders["small"], Path(run_dir)) as swarm:
        provider = swarm.add()
        c = _child("--measure-step", str(folders["small"]), str(provider.addr), "--tokens", str(args.tokens))
    small_ckpt = sum(f.stat().st_size for f in folders["small"].glob("*.safetensors"))
    print(f"(c) one remote step of the small model ({_mb(small_ckpt)} checkpoint, {c['tokens']} tokens, "
          f"{c['remote_calls']} remote calls) through one provider process:")
    print(f"    model state {_mb(c['state'])} ({c['state'] / small_ckpt:.3f} of its checkpoint), "
          f"activations and step buffers {_mb(c['peak'] - c['state'])}, peak {_mb(c['peak'])} beyond the baseline")


if __name__ == "__main__":
    main()
