"""Fine-tune a model with LoRA as a client of a swarm: every base matmul is encrypted and computed
by providers found from the bootstrap addresses; LoRA weights and the optimizer stay here.

    cipherswarm train --bootstrap /ip4/127.0.0.1/tcp/4001/p2p/12D3KooW... --steps 50 --out runs/mine
    cipherswarm train --bootstrap ... --steps 50 --out runs/mine --resume    # after a crash: same options
    cipherswarm train --bootstrap ... --steps 50 --out runs/mine --max-price 200 --budget 5000

Writes ``adapter/`` (peft LoRA weights), ``loss.png`` (training and held-out loss) and
``report.json`` (with greedy samples of a few held-out prompts before and after) into --out, prints
the samples, and checkpoints into --out/checkpoints as it goes (every step by default): --resume
continues the run there at its last checkpoint, with the losses an uninterrupted run would have
had. The defaults fine-tune the bundled tiny Shakespeare LLaMA on its bundled fine-tuning set.
--model may be a causal LM or a sentence encoder (BERT-style, trained on anchor/positive pairs;
trainer/tasks.py); any other model is refused before the swarm is joined.

Prices are in the unit providers advertise (`cipherswarm provider --price`, per 10^9 MACs); a
receipt charges macs x price / 10^9, rounded up, and `cipherswarm ledger` sums them. --max-price
leaves out providers asking more; --budget caps what this invocation pays, held-out evaluations
included: after each optimizer step, the next step's cost is taken as the dearest step so far (plus
the evaluation after training, before the last step), and if it would take the spending past the
budget the run stops there, checkpointed, with exit code 3, saying what was spent and how to go on
(--resume with a new --budget for the next sitting). The first step's cost is only known once it is
paid: `cipherswarm estimate --price-per-gmac P`, with P the providers' price, predicts a run's price
in the same unit.

Exit codes: 0 done, 1 failure, 2 bad command line, 3 stopped by --budget (checkpoint saved).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import get_args

from cipherswarm.cli.bits import add_binding_budget_argument, add_precision_arguments, add_profile_argument, precision_of
from cipherswarm.cli.dashboard import TrainerHolder, add_dashboard_argument, client_dashboard
from cipherswarm.cli.steps import add_step_arguments, positive_int
from cipherswarm.node.client.config import ClientConfig, Prefer
from cipherswarm.node.client.keys import CLIENT_PROFILES
from cipherswarm.trainer.errors import TrainingStopped
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL, FinetuneConfig

DATA_HELP = ("training data: a .txt, .jsonl or .parquet file, a folder saved by datasets' save_to_disk, or a folder with "
             "train.* (and valid.*); records: text, prompt/completion, chat messages, or anchor/positive pairs for a "
             "sentence encoder (trainer/README.md, Data)")

CHECKPOINTS = "checkpoints"  # under --out
BUDGET_STOP = 3  # exit code: stopped by --budget, checkpointed (1 is a failure, 2 a bad command line)


def amount(text: str) -> int:
    """argparse type of prices and budgets: whole units, 0 or more."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def rate(text: str) -> float:
    """argparse type of a link's rate: a number, 0 or more."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


class Budget:
    """The ``on_step`` of a run with --budget: stops it before the optimizer step that would take
    what this sitting paid (``paid()``, the sum of its countersigned receipts) past ``limit``.

    A step's cost is not known before it is paid, so the next one is taken to cost as much as the
    dearest this sitting paid; before the last step the held-out evaluation after training is added
    (the one before, if this sitting paid it, or else a step's cost). The first step is only refused
    if the evaluation before it already spent the budget."""

    def __init__(self, limit: int, steps: int, paid: Callable[[], int]) -> None:
        self.limit, self.steps, self.paid = limit, steps, paid
        self.spent = 0
        self.step_cost = 0  # the dearest step of this sitting
        self.next_cost = 0  # what the step refused would have cost, as estimated
        self._evaluation: int | None = None  # the held-out evaluation before, if this sitting paid for it
        self._started = False

    def __call__(self, done: int) -> str | None:
        paid = self.paid()
        if not self._started:  # before this sitting's first step
            self._started = True
            self._evaluation = paid or None
            self.spent = paid
            return f"the held-out evaluation before training cost {paid:,}" if paid > self.limit else None
        self.step_cost = max(self.step_cost, paid - self.spent)
        self.spent = paid
        last = done + 1 == self.steps
        self.next_cost = self.step_cost + ((self._evaluation or self.step_cost) if last else 0)
        if paid + self.next_cost <= self.limit:
            return None
        return f"step {done + 1}{' and the evaluation after it' if last else ''} would cost about {self.next_cost:,}"


def add_client_arguments(p: argparse.ArgumentParser) -> None:
    """The client's own flags, shared by `train` and `testnet`."""
    p.add_argument("--prefer", choices=get_args(Prefer), default="balanced",
                   help="what providers are chosen for: speed (price ignored), price (the cheapest with a free slot "
                        "gets every chunk it can take, any other one chunk to measure it) or balanced (at most twice "
                        "the cheapest price, then time x price; node/README.md, Scheduling) (default balanced)")
    p.add_argument("--uplink-mbit", type=rate, default=0.0, metavar="MBIT",
                   help="your link's upload rate in Mbit/s: on a fast link, big requests are then written several at "
                        "once when one provider takes them slower than the link sends (node/client/uploads.py); "
                        "unset, they go one at a time, which is right for a home uplink (default unset)")
    add_binding_budget_argument(p)


def client_config(args: argparse.Namespace) -> ClientConfig:
    """The client's config from the command line: --prefer, --uplink-mbit, --binding-budget-mb, and
    --max-price where the command has one."""
    max_price = getattr(args, "max_price", None)
    return ClientConfig(prefer=args.prefer, uplink_bps=args.uplink_mbit * 1e6 / 8, binding_budget=args.binding_budget_mb << 20,
                        **({} if max_price is None else {"max_price_per_gmac": max_price}))


def add_arguments(p: argparse.ArgumentParser) -> None:
    defaults = FinetuneConfig()
    p.add_argument("--bootstrap", nargs="+", required=True, metavar="MULTIADDR",
                   help="provider addresses to join the swarm through (as `cipherswarm provider` prints them)")
    p.add_argument("--listen", default="/ip4/127.0.0.1/tcp/0", metavar="MULTIADDR",
                   help="where this client listens (default: loopback, free port). Listening where providers can "
                        "reach it, e.g. /ip4/0.0.0.0/tcp/4001, lets it punch through the NAT of a provider "
                        "reached through a relay and then talk to it directly (node/nat/README.md)")
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
    p.add_argument("--max-price", type=amount, default=None, metavar="PRICE",
                   help="the most to pay per 10^9 MACs, in the providers' unit (their --price): dearer providers are "
                        "not used, and requests never offer more (default: no limit)")
    add_client_arguments(p)
    p.add_argument("--budget", type=amount, default=None, metavar="AMOUNT",
                   help="the most this invocation pays, in the unit of the receipts (`cipherswarm ledger`, `cipherswarm "
                        f"estimate --price-per-gmac`): stop, checkpointed, with exit code {BUDGET_STOP} before the step "
                        "that would exceed it; go on with --resume and a new --budget (default: no limit)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out from its last checkpoint (give the same training options); "
                        "without it, an --out holding checkpoints is refused")
    add_dashboard_argument(p)


def run(args: argparse.Namespace) -> int:
    from cipherswarm.cli.runs import accuracy_line, report, sample_lines, save
    from cipherswarm.node import NoProvidersError, SwarmClient
    from cipherswarm.node.gguf import model_dir
    from cipherswarm.node.logs import configure_logging
    from cipherswarm.trainer.checkpoint import open_run
    from cipherswarm.trainer.finetune import finetune
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
    config_of_client = client_config(args)
    budget = None
    try:
        with SwarmClient(model_dir=args.model, bootstrap=args.bootstrap, precision=config.precision, profile=config.profile,
                         identity=args.identity, ledger=args.ledger, min_providers=args.min_providers,
                         config=config_of_client, listen=args.listen) as client:
            budget = None if args.budget is None else Budget(args.budget, config.steps, lambda: client.stats().paid)
            trainer = TrainerHolder()
            with client_dashboard(args.dashboard, client, steps=config.steps, records=trainer.records):
                result = finetune(config, fhe="remote", executor=client, checkpoint_dir=checkpoints,
                                  save_steps=args.checkpoint_every, resume=args.resume, in_flight=args.in_flight,
                                  on_step=budget, on_trainer=trainer)
            swarm = client.stats()
    except NoProvidersError as exc:
        print(f"{exc}", file=sys.stderr)
        return 1
    except TrainingStopped as stop:
        assert budget is not None  # the only on_step given
        print(budget_message(stop, budget, args.out, config.steps), file=sys.stderr)
        return BUDGET_STOP
    save(args.out, result, report(result, swarm=swarm, extra={"resumed_at_step": result.resumed_at}))
    print(accuracy_line(result))
    for line in sample_lines(result):
        print(line)
    if result.resumed_at:
        print(f"resumed at step {result.resumed_at} from {checkpoints}")
    print(f"loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, held-out {result.eval_before:.4f} -> "
          f"{result.eval_after:.4f}; wrote {args.out / 'adapter'}, {args.out / 'loss.png'}, {args.out / 'report.json'}")
    return 0


def budget_message(stop: TrainingStopped, budget: Budget, out: Path, steps: int) -> str:
    """What a run stopped by --budget spent, where it stands, and the command line to go on."""
    where = f"checkpoint {stop.checkpoint}" if stop.checkpoint is not None else f"no step done yet; {out / CHECKPOINTS} holds the run"
    return (f"stopped by --budget {budget.limit:,} after step {stop.step} of {steps}: {stop.reason}, and this invocation "
            f"spent {budget.spent:,} (receipts in its ledger; `cipherswarm ledger`).\n{where}.\n"
            f"to go on: the same command with --resume --budget AMOUNT (what the next invocation may spend; about "
            f"{budget.next_cost or budget.spent:,} for the next step)")
