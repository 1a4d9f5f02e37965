"""Start a local swarm of provider processes on 127.0.0.1 and fine-tune the bundled model through it.

Each provider is a real ``cipherswarm provider`` process with its own identity; the others join
through the first one's address, and the client finds them all from that one bootstrap address.
With three or more providers the last one holds only the first two transformer blocks, as a
small gaming GPU would. The client fine-tunes with ``fhe="remote"`` while a live table shows the
swarm; then the same fine-tune runs in plaintext with the same seed for comparison. In --out:
``adapter/`` (peft LoRA weights), ``loss.png`` (both loss curves) and ``report.json``.

Nothing leaves loopback. Ctrl-C stops every process.

    cipherswarm testnet                            # 3 providers, 12 steps
    cipherswarm testnet --malicious 1 --kill-one   # one cheater (caught and banned), one crash
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from cipherswarm.cli.localswarm import ProviderProcess, start_provider, terminate_as_interrupt
from cipherswarm.cli.provider import CHEATS
from cipherswarm.cli.bits import add_precision_arguments, add_profile_argument, precision_of
from cipherswarm.cli.dashboard import add_dashboard_argument, client_dashboard
from cipherswarm.cli.train import DATA_HELP, add_client_arguments, client_config
from cipherswarm.cli.steps import add_step_arguments
from cipherswarm.node.client.keys import CLIENT_PROFILES
from cipherswarm.trainer.finetune import BUNDLED_DATA, BUNDLED_MODEL


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--providers", type=int, default=3, help="provider processes to start (default 3)")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps of the fine-tune (default 12)")
    p.add_argument("--out", type=Path, default=Path("runs/testnet"), help="output folder (default runs/testnet)")
    p.add_argument("--model", type=Path, default=BUNDLED_MODEL, help="HF model directory or .gguf file (default: bundled tiny LLaMA)")
    p.add_argument("--data", type=Path, default=BUNDLED_DATA, help=DATA_HELP)
    p.add_argument("--malicious", type=int, default=0, metavar="K", help="make the last K providers cheat")
    p.add_argument("--cheat", choices=CHEATS, default="flip",
                   help="how malicious providers cheat (default: flip one value)")
    p.add_argument("--kill-one", action="store_true", help="kill an honest provider halfway through training")
    p.add_argument("--seed", type=int, default=0, help="seed of the fine-tune (data order, LoRA init)")
    add_step_arguments(p)
    p.add_argument("--no-compare", action="store_true", help="skip the plaintext run of the same seed")
    add_precision_arguments(p)
    add_profile_argument(p, CLIENT_PROFILES)
    p.add_argument("--startup-timeout", type=float, default=180.0, help="seconds to wait for each provider")
    add_client_arguments(p)
    add_dashboard_argument(p)


def start_testnet_provider(i: int, args: argparse.Namespace, bootstrap: str | None, run_dir: Path) -> ProviderProcess:
    """Provider ``i`` of the testnet: the last K cheat, and with three or more the last one holds
    only the first two blocks."""
    cheat = args.cheat if i >= args.providers - args.malicious else None
    layers = ["*.0.*", "*.1.*"] if args.providers >= 3 and i == args.providers - 1 else []
    return start_provider(i, model=args.model, run_dir=run_dir, bootstrap=bootstrap, layers=layers, cheat=cheat,
                          weight_bits=args.weight_bits)


def run(args: argparse.Namespace) -> int:
    from cipherswarm.cli.live import SwarmView, live
    from cipherswarm.cli.runs import accuracy_line, report, sample_lines, save
    from cipherswarm.node import SwarmClient
    from cipherswarm.node.logs import route_libp2p_logs
    from cipherswarm.node.gguf import model_dir
    from cipherswarm.trainer.finetune import FinetuneConfig, finetune
    from cipherswarm.trainer.tasks import task_of

    if args.providers < 1 or not 0 <= args.malicious < args.providers:
        print("need at least one provider, and at least one honest provider", file=sys.stderr)
        return 2
    if not (args.model.is_dir() or args.model.suffix == ".gguf" and args.model.is_file()):
        print(f"model {args.model} not found: pass --model DIR (a Hugging Face safetensors folder) or a .gguf file",
              file=sys.stderr)
        return 2
    args.model = model_dir(args.model)  # a .gguf file: its converted folder, which the providers load too
    task_of(args.model)  # an unsupported model is refused before any provider starts
    run_dir = args.out / "swarm"
    run_dir.mkdir(parents=True, exist_ok=True)
    # the client's records (bans, retries, key rotations) go to a file: the live view shows them
    logging.basicConfig(filename=run_dir / "client.log", level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    route_libp2p_logs(run_dir / "client.log")
    providers: list[ProviderProcess] = []
    with terminate_as_interrupt() as termination:  # SIGTERM too stops the providers (`finally`)
        try:
            print(f"starting {args.providers} providers on 127.0.0.1 (logs in {run_dir}) ...", flush=True)
            first = start_testnet_provider(0, args, None, run_dir)
            providers.append(first)
            first.wait_addr(args.startup_timeout)
            providers += [start_testnet_provider(i, args, first.addr, run_dir) for i in range(1, args.providers)]
            for p in providers[1:]:
                p.wait_addr(args.startup_timeout)
            for p in providers:
                role = f"cheats ({p.cheat})" if p.cheat else "honest"
                held = ", ".join(p.layers) if p.layers else "all layers"
                print(f"  provider {p.index}: {p.addr}  price {p.price}/GMAC  {held}  {role}")

            precision = precision_of(args)
            config = FinetuneConfig(model_dir=args.model, data_dir=args.data, steps=args.steps, seed=args.seed,
                                    forward_bits=precision.forward_bits, backward_bits=precision.backward_bits,
                                    weight_bits=precision.weight_bits, gradient_accumulation_steps=args.accumulation,
                                    profile=args.profile)
            victim = next((p for p in providers[1:] if not p.cheat and not p.layers), None) if args.kill_one else None
            with SwarmClient(model_dir=args.model, bootstrap=[first.addr], identity=run_dir / "client.key",
                             ledger=run_dir / "ledger.sqlite", precision=config.precision, profile=config.profile,
                             min_providers=args.providers, config=client_config(args)) as client:
                view = SwarmView(client=client, steps=args.steps, names={p.peer_id: f"p{p.index}" for p in providers})

                def on_step(step: int) -> None:
                    if victim is not None and not victim.killed and step >= args.steps // 2:
                        victim.proc.kill()
                        victim.killed = True
                        view.note(f"killed provider {victim.index} at step {step}")

                view.on_step = on_step

                def records() -> tuple:
                    return () if view.trainer is None else view.trainer.step_records

                with live(view), client_dashboard(args.dashboard, client, steps=args.steps, records=records):
                    result = finetune(config, fhe="remote", executor=client, progress=False, on_trainer=view.watch,
                                      in_flight=args.in_flight)
                swarm = client.stats()
            print(f"encrypted fine-tune: {len(result.losses)} steps, loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
                  f"held-out {result.eval_before:.4f} -> {result.eval_after:.4f} ({result.wall_s:.0f} s)")
            print(accuracy_line(result))
            plain = None
            if not args.no_compare:
                print("plaintext fine-tune of the same seed, for comparison ...", flush=True)
                plain = finetune(config, fhe="disable", progress=False)
                print(f"plaintext fine-tune: loss {plain.losses[0]:.4f} -> {plain.losses[-1]:.4f}, "
                      f"held-out {plain.eval_before:.4f} -> {plain.eval_after:.4f} ({plain.wall_s:.1f} s)")
            extra = {"providers": [{"index": p.index, "peer": p.peer_id, "addr": p.addr, "price_per_gmac": p.price,
                                    "layers": p.layers or "all", "cheat": p.cheat, "killed": p.killed} for p in providers]}
            summary = report(result, swarm=swarm, plain=plain, extra=extra)
            save(args.out, result, summary, plain=plain)
            if plain is not None:
                print(f"final loss, encrypted vs plaintext: {summary['final_loss_difference_pct']}% apart")
            for peer, reason in swarm.bans.items():
                print(f"banned {view.names.get(peer, peer)}: {reason}")
            for line in sample_lines(result):
                print(line)
            print(f"wrote {args.out / 'adapter'}, {args.out / 'loss.png'}, {args.out / 'report.json'}")
            return 0
        except BaseException as exc:
            # an interrupt that reached the client's trio tasks comes out of their nursery in a group;
            # after SIGTERM, whatever failed is the stop it asked for (see localswarm.Termination)
            only_interrupts = isinstance(exc, KeyboardInterrupt) or (
                isinstance(exc, BaseExceptionGroup) and exc.split(KeyboardInterrupt)[1] is None)
            if not (only_interrupts or termination.requested):
                raise  # something else failed: not (only) an interrupt
            print("\ninterrupted: stopping providers", file=sys.stderr)
            return 130
        finally:
            for p in providers:
                p.stop()
