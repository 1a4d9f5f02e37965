"""A NAT lab in Linux network namespaces, for the tests and bench/nat.py (root only).

    this process (root namespace) 10.77.R.100 ──┐
    relay namespace "<tag>pub"    10.77.R.1   ──┤ bridge in <tag>pub (the "public" network)
    router K "<tag>rK"            10.77.R.(10+K) ┘   MASQUERADE out of it, ip_forward on
        └── home K "<tag>hK"      10.(80+K).R.2, default route via 10.(80+K).R.1 (router K)

Two kinds of NAT router: "cone" (plain MASQUERADE: a connection keeps its source port where that
port is free, so one local port maps to one public port whoever the remote is: an endpoint-
independent mapping, what most home routers do) and "symmetric" (MASQUERADE --random-fully: each
new connection gets a random public port, so the port a peer sees depends on who it talks to: an
endpoint-dependent mapping, as on carrier-grade NATs and some corporate firewalls).

Every address is on these veth links only; the public side has no route into a home network, so a
provider at home is reachable only through the connections it opens itself (a NAT router's
behaviour: MASQUERADE keeps no port forwarding). R and the names' tag are random per lab, so
labs of concurrent runs do not collide; `close` (also on a failed `open`) removes everything.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field

RUN_TIMEOUT_S = 10.0


class LabUnavailable(RuntimeError):
    """Namespaces cannot be made here (not root, no `ip`/`iptables`, or no permission)."""


def _run(*cmd: str) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    if done.returncode != 0:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done.stdout


@dataclass
class NatLab:
    """The namespaces of one lab; `open` builds it."""

    homes: int
    symmetric: frozenset[int] = frozenset()
    """The homes whose router maps endpoint-dependently (the others: cone)."""
    tag: str = field(default_factory=lambda: "cs" + os.urandom(3).hex())
    subnet: int = field(default_factory=lambda: 1 + os.urandom(1)[0] % 250)
    _namespaces: list[str] = field(default_factory=list)
    _root_links: list[str] = field(default_factory=list)
    _root_routes: list[str] = field(default_factory=list)

    @property
    def public_ns(self) -> str:
        return f"{self.tag}pub"

    @property
    def relay_ip(self) -> str:
        return f"10.77.{self.subnet}.1"

    @property
    def client_ip(self) -> str:
        return f"10.77.{self.subnet}.100"

    def home_ns(self, k: int) -> str:
        return f"{self.tag}h{k}"

    def home_ip(self, k: int) -> str:
        return f"10.{80 + k}.{self.subnet}.2"

    def router_public_ip(self, k: int) -> str:
        return f"10.77.{self.subnet}.{10 + k}"

    def exec_prefix(self, namespace: str) -> list[str]:
        """Command prefix that runs a program inside `namespace`."""
        return ["ip", "netns", "exec", namespace]

    def open(self) -> NatLab:
        if os.geteuid() != 0 or not shutil.which("ip") or not shutil.which("iptables"):
            raise LabUnavailable("network namespaces need root, iproute2 and iptables (.ci/setup installs them)")
        try:
            self._build()
        except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
            detail = getattr(exc, "stderr", "") or exc
            self.close()
            raise LabUnavailable(f"cannot build the namespaces: {detail}") from exc
        return self

    def _netns(self, name: str) -> None:
        _run("ip", "netns", "add", name)
        self._namespaces.append(name)
        _run(*self.exec_prefix(name), "ip", "link", "set", "lo", "up")

    def _in(self, ns: str, *cmd: str) -> None:
        _run(*self.exec_prefix(ns), *cmd)

    def _build(self) -> None:
        pub, bridge, s = self.public_ns, "br0", self.subnet
        self._netns(pub)
        self._in(pub, "ip", "link", "add", bridge, "type", "bridge")
        self._in(pub, "ip", "addr", "add", f"{self.relay_ip}/24", "dev", bridge)
        self._in(pub, "ip", "link", "set", bridge, "up")
        # this process's side of the public network
        root = f"{self.tag}c"
        _run("ip", "link", "add", root, "type", "veth", "peer", "name", "c", "netns", pub)
        self._root_links.append(root)
        _run("ip", "addr", "add", f"{self.client_ip}/24", "dev", root)
        _run("ip", "link", "set", root, "up")
        self._in(pub, "ip", "link", "set", "c", "master", bridge, "up")
        for k in range(self.homes):
            router, home = f"{self.tag}r{k}", self.home_ns(k)
            self._netns(router)
            self._netns(home)
            self._in(pub, "ip", "link", "add", f"r{k}", "type", "veth", "peer", "name", "wan", "netns", router)
            self._in(pub, "ip", "link", "set", f"r{k}", "master", bridge, "up")
            self._in(router, "ip", "addr", "add", f"{self.router_public_ip(k)}/24", "dev", "wan")
            self._in(router, "ip", "link", "set", "wan", "up")
            self._in(router, "ip", "link", "add", "lan", "type", "veth", "peer", "name", "eth0", "netns", home)
            self._in(router, "ip", "addr", "add", f"10.{80 + k}.{s}.1/24", "dev", "lan")
            self._in(router, "ip", "link", "set", "lan", "up")
            self._in(router, "sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
            random = ["--random-fully"] if k in self.symmetric else []
            self._in(router, "iptables", "-t", "nat", "-A", "POSTROUTING", "-o", "wan", "-j", "MASQUERADE", *random)
            # a home router's firewall: an unsolicited connection from outside is dropped without an
            # answer (a Linux box without this rule answers a SYN to a closed port with a reset)
            self._in(router, "iptables", "-A", "INPUT", "-i", "wan", "-p", "tcp", "-m", "conntrack", "--ctstate",
                     "NEW", "-j", "DROP")
            self._in(home, "ip", "addr", "add", f"{self.home_ip(k)}/24", "dev", "eth0")
            self._in(home, "ip", "link", "set", "eth0", "up")
            self._in(home, "ip", "route", "add", "default", "via", f"10.{80 + k}.{s}.1")
            # a dial from this process to a home address fails at once instead of leaving the lab
            # through this machine's default route
            _run("ip", "route", "add", "unreachable", f"10.{80 + k}.{s}.0/24")
            self._root_routes.append(f"10.{80 + k}.{s}.0/24")

    def close(self) -> None:
        """Remove every namespace and link of the lab (deleting a namespace deletes its links and
        kills nothing: callers stop their processes first)."""
        for route in self._root_routes:
            subprocess.run(["ip", "route", "del", "unreachable", route], capture_output=True, timeout=RUN_TIMEOUT_S)
        for link in self._root_links:
            subprocess.run(["ip", "link", "del", link], capture_output=True, timeout=RUN_TIMEOUT_S)
        for ns in reversed(self._namespaces):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=RUN_TIMEOUT_S)
        self._root_links.clear()
        self._root_routes.clear()
        self._namespaces.clear()

    def __enter__(self) -> NatLab:
        return self.open()

    def __exit__(self, *exc: object) -> None:
        self.close()
