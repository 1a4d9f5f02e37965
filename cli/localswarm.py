"""Provider processes on 127.0.0.1: what ``cipherswarm testnet``, the swarm benchmarks and the tests start.

Each provider is a real ``cipherswarm provider`` process with its own identity key and log file;
every provider after the first joins through the first one's address. Nothing leaves loopback.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from multiaddr import Multiaddr

from cipherswarm.fhe_backend.quant import WEIGHT_BITS


@dataclass
class Termination:
    """Whether SIGTERM arrived while ``terminate_as_interrupt`` was open.

    The KeyboardInterrupt it raises can surface as another exception: raised inside a native
    extension's callback (safetensors reading a tensor, say), it comes back as that extension's
    ValueError. Whatever fails after SIGTERM is then the stop the signal asked for, not a bug."""

    requested: bool = False


@contextmanager
def terminate_as_interrupt() -> Iterator[Termination]:
    """While open, SIGTERM stops this process as Ctrl-C does (KeyboardInterrupt, through trio's own
    handler where one is installed), so that the code owning provider processes stops them: a
    process killed by SIGTERM, a service manager's or a test harness's, would otherwise leave its
    providers running with nobody to stop them."""
    termination = Termination()

    def interrupt(signum: int, frame: object) -> None:
        termination.requested = True
        handler = signal.getsignal(signal.SIGINT)
        if not callable(handler):  # SIGINT ignored (a background job): nobody else will raise it
            raise KeyboardInterrupt
        handler(signal.SIGINT, frame)  # raises KeyboardInterrupt now, or trio's, once it is safe to

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield termination
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class ProviderProcess:
    """One provider process and what its launcher knows about it."""

    index: int
    proc: subprocess.Popen
    log: Path
    price: int
    layers: list[str]
    cheat: str | None
    addr: str = ""
    killed: bool = False
    _lines: queue.Queue = field(default_factory=queue.Queue)

    @property
    def peer_id(self) -> str:
        return self.addr.rsplit("/p2p/", 1)[-1]

    @property
    def multiaddr(self) -> Multiaddr:
        """``addr`` parsed, for the node APIs that take one."""
        return Multiaddr(self.addr)

    def wait_addr(self, timeout: float) -> str:
        """The multiaddr the provider prints once it is serving; RuntimeError with its log if it dies."""
        threading.Thread(target=self._pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._lines.get(timeout=0.5)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if line is None:
                break
            if "/p2p/" in line:
                self.addr = line.strip()
                return self.addr
        tail = self.log.read_text(errors="replace")[-2000:] if self.log.exists() else ""
        raise RuntimeError(f"provider {self.index} did not start (exit {self.proc.poll()}); its log:\n{tail}")

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def stop(self) -> int:
        """SIGTERM, then SIGKILL after 10 s; the exit status (0: it stopped cleanly)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def start_provider(
    index: int,
    *,
    model: Path,
    run_dir: Path,
    bootstrap: str | Sequence[str] | None = None,
    price: int | None = None,
    layers: Sequence[str] = (),
    cheat: str | None = None,
    threads: int = 1,
    weight_bits: int = WEIGHT_BITS,
    benchmark_s: float | None = None,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    name: str | None = None,
    listen: str = "/ip4/127.0.0.1/tcp/0",
    prefix: Sequence[str] = (),
) -> ProviderProcess:
    """Launch provider ``index`` (price 10 * (index + 1) per GMAC unless given) with its key and log in
    ``run_dir``; call ``wait_addr`` on the result before using it.

    ``bootstrap``: one multiaddr or several. For tests: ``benchmark_s`` shortens the start-up
    throughput measurement, ``extra_args`` are further ``cipherswarm provider`` flags (last, so they
    win over the ones above) and ``env`` further environment variables. ``name`` (default
    ``provider<index>``) names its key and log files, ``listen`` its listen address, and ``prefix``
    runs it under another command, e.g. in a network namespace (node/nat/netns.py)."""
    price = 10 * (index + 1) if price is None else price
    name = f"provider{index}" if name is None else name
    log = run_dir / f"{name}.log"
    cmd = [*prefix, sys.executable, "-m", "cipherswarm.cli", "provider", "--model", str(model),
           "--listen", listen, "--identity", str(run_dir / f"{name}.key"),
           "--price", str(price), "--log-file", str(log), "--advert-interval", "2", "--weight-bits", str(weight_bits)]
    if bootstrap:
        cmd += ["--bootstrap", *([bootstrap] if isinstance(bootstrap, str) else bootstrap)]
    if layers:
        cmd += ["--layers", *layers]
    if cheat:
        cmd += ["--cheat", cheat]
    if benchmark_s is not None:
        cmd += ["--benchmark-seconds", str(benchmark_s)]
    cmd += extra_args
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "CIPHERSWARM_THREADS": str(threads), **(env or {})}
    with open(log, "ab") as err:
        # own session: the terminal's Ctrl-C reaches only the launcher, which stops providers in order
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=environment, start_new_session=True)
    return ProviderProcess(index, proc, log, price, list(layers), cheat)
