"""The --dashboard option of `train`, `testnet` and `provider`: a live local web page of the node
(node/dashboard/). Loopback unless the user names another address, which is then served with a
warning: the page is read-only and shows no secret, but it does show the swarm and the run.
"""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

DEFAULT_HOST = "127.0.0.1"


def dashboard_address(text: str) -> tuple[str, int]:
    """argparse type of --dashboard: PORT, HOST:PORT or [IPv6]:PORT, HOST an IP address or localhost."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]") if sep else DEFAULT_HOST
    if host != "localhost":
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{host!r} is not an IP address or localhost") from None
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise argparse.ArgumentTypeError(f"port must be 0 to 65535 (0: a free one), got {port!r}")
    return host, int(port)


def add_dashboard_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dashboard", type=dashboard_address, default=None, metavar="[HOST:]PORT",
                   help="serve a live read-only web page of this node on HOST:PORT (default host 127.0.0.1; port 0: "
                        "a free one, printed); another host than loopback exposes the page to the network, with a warning")


def announce(bound: Any) -> None:
    """Print where the dashboard listens (a `Bound`), and warn when it is reachable beyond this machine."""
    print(f"dashboard: {bound.url}", flush=True)
    if not bound.loopback:
        print(f"warning: the dashboard listens on {bound.host}, not loopback: anyone who can reach this address "
              "sees this node's peers, prices and progress (read-only)", file=sys.stderr, flush=True)


def step_points(records: Sequence[Any]) -> list[Any]:
    """The trainer's step records (trainer.StepRecord) as the dashboard's StepPoints."""
    from cipherswarm.node.dashboard import StepPoint

    return [StepPoint(step=r.step, loss=r.loss, eval_loss=None if not r.eval else r.eval.get("eval_loss"),
                      tokens_per_s=r.tokens / max(r.wall_s, 1e-9), bytes_sent=r.bytes_sent,
                      bytes_received=r.bytes_received) for r in records]


@contextlib.contextmanager
def client_dashboard(address: tuple[str, int] | None, client: Any, *, steps: int,
                     records: Callable[[], Sequence[Any]]) -> Iterator[None]:
    """Serve a running SwarmClient's dashboard while the block runs (nothing if `address` is None).
    `records` gives the trainer's step records so far."""
    if address is None:
        yield
        return
    from cipherswarm.node.dashboard import ClientBoard, serving_in_thread

    board = ClientBoard(stats=client.stats, ledger=client.ledger_path, steps=lambda: step_points(records()),
                        total_steps=steps)
    with serving_in_thread(board.snapshot, host=address[0], port=address[1]) as bound:
        announce(bound)
        yield


class TrainerHolder:
    """finetune's `on_trainer`: keeps the trainer so that a view can read its step records."""

    def __init__(self) -> None:
        self.trainer: Any = None

    def __call__(self, trainer: Any) -> None:
        self.trainer = trainer

    def records(self) -> Sequence[Any]:
        return () if self.trainer is None else self.trainer.step_records
