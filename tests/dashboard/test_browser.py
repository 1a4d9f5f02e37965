"""The dashboard in a real headless Chromium: a provider process's page counting a malformed request
it refused, and (slow stage) a testnet client's page whose step, loss and bytes change as it trains.
Each test reads the browser's console (no warning or error allowed) and checks a screenshot is not
blank."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import trio

from cipherswarm.trainer.finetune import BUNDLED_MODEL

from caps import time_limit
from dashboard_helpers import (a_client_snapshot, browser, card, console_problems, needs_browser, pixel_spread,
                               send_malformed_request, state, wait_for)

pytestmark = needs_browser
BLANK_SPREAD = 5.0  # grey-level standard deviation: a blank page is about 0, the dashboard's some tens


@contextmanager
def cipherswarm(args: list[str], log: Path) -> Iterator[queue.Queue[str | None]]:
    """Run `cipherswarm ARGS` with stdout lines fed to the queue (None at the end); stopped after."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CIPHERSWARM_THREADS": "1"}
    with open(log, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "cipherswarm.cli", *args], stdout=subprocess.PIPE, stderr=err,
                                text=True, env=env)
    lines: queue.Queue[str | None] = queue.Queue()

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line.rstrip("\n"))
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield lines
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def line_with(lines: queue.Queue[str | None], needle: str, timeout_s: float, log: Path) -> str:
    """The first stdout line containing `needle`; AssertionError with the log's tail otherwise."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            continue
        if line is None:
            break
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r}; log:\n{log.read_text(errors='replace')[-3000:]}")


def test_a_provider_page_counts_a_refused_request(tmp_path: Path) -> None:
    log = tmp_path / "provider.log"
    args = ["provider", "--model", str(BUNDLED_MODEL), "--identity", str(tmp_path / "provider.key"),
            "--benchmark-seconds", "0.1", "--advert-interval", "2", "--dashboard", "127.0.0.1:0"]
    with cipherswarm(args, log) as lines, browser() as driver:
        addr = line_with(lines, "/p2p/", 120, log)
        url = line_with(lines, "dashboard: ", 30, log).split()[1]
        assert url.startswith("http://127.0.0.1:") and not url.endswith(":0/")
        driver.get(url)
        wait_for(lambda: card(driver, "rejected") == "0" and card(driver, "served") == "0", 20, "the provider's figures")
        assert driver.find_element("id", "status").text == "live"
        assert card(driver, "layers") == "28 / 28"

        trio.run(send_malformed_request, addr)
        wait_for(lambda: state(url)["provider"]["rejected"] == {"bad_frame": 1}, 20, "the refusal in the JSON")
        wait_for(lambda: card(driver, "rejected") == "1", 10, "the refusal on the page")
        rows = driver.execute_script("return [...document.querySelectorAll('#rejected tbody tr')]"
                                     ".map((tr) => tr.innerText.split('\\t'))")
        assert rows == [["bad_frame", "1"]]
        assert pixel_spread(driver.get_screenshot_as_png()) > BLANK_SPREAD
        assert console_problems(driver) == []


def test_a_client_page_shows_peer_strings_as_text() -> None:
    """A peer's advert is written by the peer: a device string carrying HTML must show as text."""
    from cipherswarm.node.dashboard import serving_in_thread

    with serving_in_thread(a_client_snapshot, host="127.0.0.1", port=0) as bound, browser() as driver:
        driver.get(bound.url)
        wait_for(lambda: card(driver, "step") == "1 / 3", 20, "the client's figures")
        cells = driver.execute_script("return [...document.querySelectorAll('#peers tbody td')].map((td) => td.textContent)")
        assert cells[1] == "relayed" and cells[2] == "<img src=x onerror=alert(1)>" and cells[6] == "–" and cells[12] == "7"
        assert driver.execute_script("return document.querySelectorAll('#peers img').length") == 0
        assert card(driver, "loss") == "2.5000" and card(driver, "paid") == "7"
        assert pixel_spread(driver.get_screenshot_as_png()) > BLANK_SPREAD
        assert console_problems(driver) == []


@pytest.mark.slow
@time_limit(130)  # 30 s measured on 2 busy cores (96 s once beside other work)
def test_a_testnet_page_follows_the_training(tmp_path: Path) -> None:
    """One provider process, three optimizer steps of the bundled model: the page's step, loss and
    bytes must change while it trains, and what it says each provider was paid must add up."""
    log = tmp_path / "testnet.log"
    args = ["testnet", "--providers", "1", "--steps", "3", "--no-compare", "--out", str(tmp_path / "run"),
            "--dashboard", "127.0.0.1:0"]
    with cipherswarm(args, log) as lines, browser() as driver:
        url = line_with(lines, "dashboard: ", 300, log).split()[1]
        driver.get(url)
        wait_for(lambda: card(driver, "step").endswith(" / 3"), 30, "the client's page")
        peers = driver.execute_script("return document.querySelectorAll('#peers tbody tr').length")
        assert peers == 1
        seen: list[tuple[str, str, str]] = []
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            try:
                now = (card(driver, "step"), card(driver, "loss"), card(driver, "bytes_sent"))
                doc = state(url)
            except (urllib.error.URLError, ConnectionError):  # the run ended and took its dashboard down
                break
            if not seen or seen[-1] != now:
                seen.append(now)
            assert sum(doc["spend"].values()) <= doc["traffic"]["paid"]
            if doc["training"]["steps"] and doc["training"]["steps"][-1]["step"] == 3:
                wait_for(lambda: card(driver, "step") == "3 / 3", 10, "the last step on the page")  # polled once a second
                seen.append((card(driver, "step"), card(driver, "loss"), card(driver, "bytes_sent")))
                spend = wait_for(lambda: state(url)["spend"], 10, "the spend per provider")
                assert list(spend) == [p["peer"] for p in doc["peers"]]  # keyed as the peer table names them
                assert 0 < sum(spend.values()) <= state(url)["traffic"]["paid"]
                assert pixel_spread(driver.get_screenshot_as_png()) > BLANK_SPREAD
                assert console_problems(driver) == []
                break
            time.sleep(0.5)
        else:
            raise AssertionError(f"the run did not reach step 3 in time; seen {seen}")
    steps = [s for s, _, _ in seen]
    assert "3 / 3" in steps and len(set(steps)) >= 3, seen  # at least 0, 1 or 2, and 3 shown as the run went
    losses = {loss for _, loss, _ in seen if loss != "–"}
    assert len(losses) >= 2, seen
    sent = [s for _, _, s in seen]
    assert len(set(sent)) >= 3, seen
