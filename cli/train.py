"""Fine-tune a model with LoRA as a client of a swarm: every base matmul is encrypted and computed
by providers found from the bootstrap addresses; LoRA weights and the optimizer stay here.

    cipherswarm train --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... --steps 50 --out runs/mine
    cipherswarm train --bootstrap ... --steps 50 --out runs/mine --resume    # after a crash: same options

Writes ``adapter/`` (peft LoRA weights), ``loss.png`` (training and held-out loss) and
``report.json`` (with greedy samples of a few held-out prompts before and after) into --out, prints
the samples, and checkpoints into --out/checkpoints as it goes (every step by default): --resume
continues the run there at its last checkpoint, with the losses an uninterrupted run would have
had. The defaults fine-tune the bundled tiny Shakespeare LLaMA on its bundled fine-tuning set.
--model may be a causal LM or a sentence encoder (BERT-style, trained on anchor/positive pairs;
trainer/tasks.py); any other model is refused before the swarm is joined.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cipherswarm.cli.bits import add_precision_arguments, add_profile_argument, precision_of
from cipherswarm.cli.steps import add_step_arguments, positive_int
from cipherswarm.node.client.keys import CLIENT_PROFILES
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL, FinetuneConfig

DATA_HELP = ("training data: a .txt, .jsonl or .parquet file, a folder saved by datasets' save_to_disk, or a folder with "
             "train.* (and valid.*); records: text, prompt/completion, chat messages, or anchor/positive pairs for a "
             "sentence encoder (trainer/README.md, Data)")

CHECKPOINTS = "checkpoints"  # under --out


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    p.add_argument("--bootstrap", nargs="+", required=True, metavar="MULTIADDR",
                   help="provider addresses to join the swarm through (as `cipherswarm provider` prints them)")
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="HF model directory or .gguf file (default: bundled tiny LLaMA)")
    p.add_argument("--data", type=Path, default=BUNDLED_DATA, help=DATA_HELP)
    p.add_argument("--out", type=Path, default=Path("runs/train"), help="output folder (default runs/train)")
    p.add_argument("--steps", type=int, default=defaults.steps, help=f"optimizer steps (default {defaults.steps})")
    p.add_argument("--seq-len", type=int, default=defaults.seq_len, help="tokens per sequence")
    p.add_argument("--batch-size", type=int, default=defaults.batch_size, help="sequences per micro-batch")
    add_step_arguments(p)
    p.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate")
    p.add_argument("--lora-r", type=int, default=defaults.lora_r, help="LoRA rank")
    p.add_argument("--target-modules", nargs="+", default=None,
                   help="modules that get adapters (default: peft's for the architecture, e.g. q_proj v_proj, BERT's query value)")
    add_precision_arguments(p)
    add_profile_argument(p, CLIENT_PROFILES)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--min-providers", type=int, default=1, help="providers to find before training starts")
    p.add_argument("--identity", type=Path, default=None, help="client key file, to keep one peer id across runs (default: a fresh key each run, so providers cannot link runs)")
    p.add_argument("--ledger", type=Path, default=None, help="SQLite ledger of receipts and bans")
    p.add_argument("--checkpoint-every", type=positive_int, default=1, metavar="N",
                   help=f"checkpoint into --out/{CHECKPOINTS} every N optimizer steps and after the last (default 1)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (give the same training options); "
                        "without it, an --out holding checkpoints is refused")


def run(args: argparse.Namespace) -> int:
    from cipherswarm.cli.runs import accuracy_line, report, sample_lines, save
    from cipherswarm.node import NoProvidersError, SwarmClient
    from cipherswarm.node.gguf import model_dir
    from cipherswarm.node.logs import configure_logging
    from cipherswarm.trainer.finetune import finetune, open_run
    from cipherswarm.trainer.tasks import task_of

    configure_logging("WARNING")
    if not args.data.exists():
        print(f"--data {args.data} does not exist", file=sys.stderr)
        return 2
    args.model = model_dir(args.model)  # a .gguf file: its converted folder
    task_of(args.model)  # an unsupported model is refused before the swarm is joined
    config = FinetuneConfig(model_dir=args.model, data_dir=args.data, steps=args.steps, seq_len=args.seq_len,
                            batch_size=args.batch_size, lr=args.lr, lora_r=args.lora_r,
                            target_modules=None if args.target_modules is None else tuple(args.target_modules),
                            forward_bits=args.forward_bits,
                            backward_bits=args.backward_bits, weight_bits=args.weight_bits, seed=args.seed,
                            gradient_accumulation_steps=args.accumulation, profile=args.profile)
    checkpoints = args.out / CHECKPOINTS
    open_run(checkpoints, config, "remote", resume=args.resume)  # a mismatch fails before joining the swarm
    try:
        with SwarmClient(model_dir=args.model, bootstrap=args.bootstrap, precision=config.precision, profile=config.profile,
                         identity=args.identity, ledger=args.ledger, min_providers=args.min_providers) as client:
            result = finetune(config, fhe="remote", executor=client, checkpoint_dir=checkpoints,
                              save_steps=args.checkpoint_every, resume=args.resume, in_flight=args.in_flight)
            swarm = client.stats()
    except NoProvidersError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    save(args.out, result, report(result, swarm=swarm, extra={"resumed_at_step": result.resumed_at}))
    print(accuracy_line(result))
    for line in sample_lines(result):
        print(line)
    if result.resumed_at:
        print(f"resumed at step {result.resumed_at} from {checkpoints}")
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, held-out {result.eval_before:.4f} -> "
          f"{result.eval_after:.4f}; wrote {args.out / 'adapter'}, {args.out / 'loss.png'}, {args.out / 'report.json'}")
    return 0
