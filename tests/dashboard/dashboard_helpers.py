"""Helpers of the dashboard tests: a headless Chromium driven by selenium, what its console logged,
how much a screenshot varies, the dashboard's JSON over plain HTTP, a malformed request sent to a
provider from a real libp2p host, and a client snapshot carrying a hostile device string.

(A module with a unique name, as tests/node/node_factory.py: every test folder has a conftest.)
"""

from __future__ import annotations

import io
import json
import math
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from cipherswarm.node.dashboard import Snapshot, StepPoint
from cipherswarm.node.types import ClientStats, PeerView

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def have_browser() -> bool:
    return shutil.which(CHROMIUM) is not None and shutil.which(CHROMEDRIVER) is not None


needs_browser = pytest.mark.skipif(not have_browser(), reason=f"needs {CHROMIUM} and {CHROMEDRIVER} "
                                                              "(`apt-get install chromium chromium-driver`, .ci/setup)")


@contextmanager
def browser() -> Iterator[Any]:
    """A headless Chromium whose console log the test can read, on a fresh profile, closed after."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", "--window-size=1200,900", f"--user-data-dir={profile}"):
            options.add_argument(flag)
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
        try:
            yield driver
        finally:
            driver.quit()


def console_problems(driver: Any) -> list[str]:
    """The browser console's warnings and errors since the last call (a CSP violation, a script
    error and a failed load all land there)."""
    return [entry["message"] for entry in driver.get_log("browser") if entry["level"] in ("WARNING", "SEVERE")]


def card(driver: Any, key: str) -> str:
    """The text of the page's summary card `key`, or "" while it is not drawn."""
    return driver.execute_script("const e = document.querySelector(`[data-key='${arguments[0]}']`);"
                                 "return e === null ? '' : e.textContent;", key)


def pixel_spread(png: bytes) -> float:
    """Standard deviation of a screenshot's grey levels: about 0 for a blank page."""
    import numpy as np
    from PIL import Image

    grey = np.asarray(Image.open(io.BytesIO(png)).convert("L"), dtype=np.float64)
    return float(grey.std())


def state(url: str) -> dict[str, Any]:
    """The dashboard's /api/state, fetched as the page does."""
    with urllib.request.urlopen(url.rstrip("/") + "/api/state", timeout=10) as response:
        return json.loads(response.read())


def wait_for(check: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Poll `check` until it returns something true; AssertionError naming `what` after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")
        time.sleep(0.25)


async def send_malformed_request(provider_addr: str) -> None:
    """Open a matmul stream to the provider from a fresh libp2p host and send a frame whose header
    does not decode: the provider refuses it (BAD_FRAME) before reading anything else."""
    import trio
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.exceptions import BaseLibp2pError
    from multiaddr import Multiaddr

    from cipherswarm.node import open_host
    from cipherswarm.node.streams import close_stream
    from cipherswarm.protocol import PROTOCOL_IDS
    from cipherswarm.protocol.varint import encode_uvarint

    async with open_host(create_new_key_pair()) as node:
        peer = await node.connect(Multiaddr(provider_addr))
        stream = await node.host.new_stream(peer, list(PROTOCOL_IDS))
        try:
            await stream.write(encode_uvarint(16) + b"\xff" * 16)
            with trio.move_on_after(10):  # the refusal, then the provider resets the stream
                while await stream.read(4096):
                    pass
        except (BaseLibp2pError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the provider's reset ends the read: the refusal is counted by then
        finally:
            await close_stream(stream)


def a_client_snapshot() -> Snapshot:
    """A client's snapshot with an unmeasured (infinite) latency, a hostile device string and a
    provider reached through a relay."""
    peer = PeerView(peer="12D3KooWpeer", addrs=("/ip4/10.0.0.1/tcp/1",), device="<img src=x onerror=alert(1)>",
                    layers=None, macs_per_second=10**9, measured_macs_per_second=math.inf, latency_s=math.inf,
                    price_per_gmac=10, free_slots=2, reputation=0.5, failures=0, chunks=0, banned="", relayed=True)
    stats = ClientStats(bytes_sent=123, paid=7, peers=(peer,))
    return Snapshot(role="client", taken_at=0.0, uptime_s=1.0, peers=stats.peers, client=stats,
                    steps=(StepPoint(step=1, loss=2.5, eval_loss=None, tokens_per_s=10.0, bytes_sent=1, bytes_received=2),),
                    total_steps=3, spend={"12D3KooWpeer": 7})
