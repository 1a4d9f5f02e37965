"""The testnet's live view: training progress and the swarm as the client sees it.

A poller thread samples the trainer's step records and the node client's statistics twice a
second; on a terminal a rich table is redrawn in place, elsewhere (CI logs, pipes) one line is
printed per optimizer step.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rich.console import Group
from rich.live import Live
from rich.table import Table
from rich.text import Text


def human_bytes(n: float) -> str:
    """1234567 -> '1.23 MB' (decimal units, as network rates are quoted)."""
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"


@dataclass
class SwarmView:
    """Shared state between the training thread, the poller and the renderer."""

    client: Any  # a SwarmClient: stats() is thread-safe
    steps: int
    names: dict[str, str] = field(default_factory=dict)  # peer id -> short name
    on_step: Callable[[int], None] | None = None
    trainer: Any = None
    stats: Any = None
    notes: list[str] = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    seen_steps: int = 0

    def watch(self, trainer: Any) -> None:
        self.trainer = trainer

    def note(self, message: str) -> None:
        self.notes.append(f"[{time.monotonic() - self.started:6.1f}s] {message}")

    def poll(self) -> list[str]:
        """Refresh the statistics; return one printable line per step finished since the last poll."""
        stats = self.client.stats()
        for peer, reason in stats.bans.items():
            if self.stats is None or peer not in self.stats.bans:
                self.note(f"banned {self.names.get(peer, peer[:12])}: {reason}")
        self.stats = stats
        records = self.trainer.step_records if self.trainer is not None else ()
        lines = []
        for r in records[self.seen_steps :]:
            lines.append(f"step {r.step}/{self.steps}  loss {r.loss:.4f}  {r.tokens / r.wall_s:.0f} tokens/s  "
                         f"sent {human_bytes(stats.bytes_sent)}  received {human_bytes(stats.bytes_received)}  "
                         f"bans {len(stats.bans)}  client CPU {cpu_split(r)}")
            if self.on_step is not None:
                self.on_step(r.step)
        self.seen_steps = len(records)
        return lines

    def __rich__(self) -> Group:
        st = self.stats
        records = self.trainer.step_records if self.trainer is not None else ()
        last = records[-1] if records else None
        head = Text(
            f"step {len(records)}/{self.steps}"
            + (f"   loss {last.loss:.4f}   {last.tokens / last.wall_s:.0f} tokens/s" if last else "   (evaluating / compiling)")
            + f"   elapsed {time.monotonic() - self.started:.0f} s"
        )
        table = Table(expand=False, title="providers, as the client sees them", title_justify="left")
        for col in ("", "peer", "path", "price/GMAC", "MAC/s adv.", "MAC/s meas.", "latency", "chunks", "failures", "status"):
            table.add_column(col, justify="right" if col not in ("", "peer", "path", "status") else "left")
        for p in st.peers if st is not None else ():
            table.add_row(self.names.get(p.peer, "?"), p.peer[:14] + "..", "relayed" if p.relayed else "direct",
                          str(p.price_per_gmac), f"{p.macs_per_second:.3g}",
                          f"{p.measured_macs_per_second:.3g}", f"{p.latency_s * 1e3:.0f} ms", str(p.chunks), str(p.failures),
                          p.banned or "ok")
        parts: list[Any] = [head, table]
        if st is not None:
            parts.append(Text(
                f"sent {human_bytes(st.bytes_sent)}   received {human_bytes(st.bytes_received)}   MACs {st.macs:.3g}   "
                f"paid {st.paid}   retries {st.retries}   hedges {st.hedges}   verification failures "
                f"{st.verification_failures}   key rotations {st.key_rotations}"))
        if last is not None:
            parts.append(Text(f"client CPU, last step: {cpu_split(last)}"))
        parts += [Text(n, style="yellow") for n in self.notes[-6:]]
        return Group(*parts)


def cpu_split(record: Any, top: int = 6) -> str:
    """A step's client CPU: the total, its largest measured parts and what no part claims."""
    parts = sorted((record.cpu_parts or {}).items(), key=lambda kv: -kv[1])[:top]
    named = "  ".join(f"{name} {seconds:.2f}" for name, seconds in parts)
    return f"{record.cpu_s:.2f} s: {named}  unnamed {record.cpu_unnamed_s:.2f}"


@contextlib.contextmanager
def live(view: SwarmView, *, interval: float = 0.5) -> Iterator[None]:
    """Poll ``view`` in the background while the block runs; draw it live on a terminal."""
    stop = threading.Event()
    tty = sys.stdout.isatty()

    def poller() -> None:
        while not stop.wait(interval):
            try:
                lines = view.poll()
            except Exception as exc:  # the view must never take training down
                view.note(f"view: {exc!r}")
                continue
            if not tty:
                for line in lines:
                    print(line, flush=True)

    thread = threading.Thread(target=poller, name="cipherswarm-view", daemon=True)
    thread.start()
    try:
        if tty:
            with Live(view, refresh_per_second=2, transient=False):
                yield
        else:
            yield
    finally:
        stop.set()
        thread.join()
        for line in view.poll() if not tty else ():
            print(line, flush=True)
