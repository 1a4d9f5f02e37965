"""The dashboard's server and snapshots without a browser: a real provider on 127.0.0.1 refusing a
malformed request and its dashboard counting it, the server's refusals (writes, foreign Host
headers, oversized or garbled requests), a non-loopback bind's warning, and --dashboard parsing."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import trio
from libp2p.crypto.ed25519 import create_new_key_pair

from cipherswarm.cli.dashboard import announce, dashboard_address
from cipherswarm.node import Provider, ProviderConfig, load_model, open_host
from cipherswarm.node.dashboard import ClientBoard, Dashboard, Snapshot, provider_source, serving_in_thread
from cipherswarm.node.dashboard.server import MAX_HEAD_BYTES
from cipherswarm.trainer.finetune import BUNDLED_MODEL

from dashboard_helpers import a_client_snapshot, send_malformed_request, state


async def http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes to 127.0.0.1:port; (status, headers, body) of the reply."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(10):
            while chunk := await stream.receive_some(65536):
                data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


def get(path: str, host: str = "127.0.0.1", method: str = "GET", extra: str = "") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}\r\n".encode()


async def test_a_provider_dashboard_counts_a_malformed_request_by_reason() -> None:
    weights = load_model(BUNDLED_MODEL)
    key_pair = create_new_key_pair()
    provider = Provider(weights=weights, key_pair=key_pair, config=ProviderConfig(benchmark_s=0.1, advert_interval_s=2.0))
    with trio.fail_after(60):
        async with open_host(key_pair) as node, trio.open_nursery() as nursery:
            await nursery.start(provider.serve, node)
            bound = await nursery.start(Dashboard(provider_source(provider, node), port=0).serve)
            assert bound.port != 0 and bound.loopback
            before = await trio.to_thread.run_sync(state, bound.url)
            assert before["role"] == "provider" and before["provider"]["rejected"] == {}
            assert before["provider"]["layers_held"] == before["provider"]["layers_total"] == len(weights.layers)
            await send_malformed_request(str(node.addrs()[0]))
            after = await trio.to_thread.run_sync(state, bound.url)
            assert after["provider"]["rejected"] == {"bad_frame": 1}
            assert after["provider"]["errors"] == 1 and after["provider"]["served"] == 0
            nursery.cancel_scope.cancel()


async def test_the_server_is_read_only_and_bounded() -> None:
    async def source() -> Snapshot:
        return a_client_snapshot()

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(Dashboard(source, port=0).serve)
        status, headers, body = await http(bound.port, get("/api/state"))
        doc = json.loads(body)
        assert status == 200 and headers["content-type"] == "application/json"
        assert doc["peers"][0]["latency_s"] is None and doc["spend"] == {"12D3KooWpeer": 7}
        assert doc["peers"][0]["relayed"] is True  # the path to it, as `cipherswarm status` shows it
        assert "addrs" not in doc["peers"][0]  # named fields only
        assert "default-src 'none'" in headers["content-security-policy"]
        status, headers, body = await http(bound.port, get("/"))
        assert status == 200 and b"/app.js" in body and headers["content-type"].startswith("text/html")
        assert (await http(bound.port, get("/api/state", method="POST", extra="Content-Length: 0\r\n")))[0] == 405
        assert (await http(bound.port, get("/api/state", method="DELETE")))[0] == 405
        assert (await http(bound.port, get("/../etc/passwd")))[0] == 404
        # DNS rebinding: a page of another origin resolving its name to 127.0.0.1
        assert (await http(bound.port, get("/api/state", host="attacker.example")))[0] == 421
        assert (await http(bound.port, get("/api/state", host=f"localhost:{bound.port}")))[0] == 200
        status, _, body = await http(bound.port, get("/api/state", method="HEAD"))
        assert status == 200 and body == b""
        assert (await http(bound.port, b"NOT HTTP AT ALL\r\n\r\n"))[0] == 400
        huge = get("/", extra=f"X-Pad: {'a' * (MAX_HEAD_BYTES + 1)}\r\n")
        assert (await http(bound.port, huge))[0] == 431
        nursery.cancel_scope.cancel()


async def test_a_failing_source_answers_503_and_the_server_goes_on() -> None:
    calls = 0

    async def source() -> Snapshot:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("the node is stopping")
        return a_client_snapshot()

    async with trio.open_nursery() as nursery:
        bound = await nursery.start(Dashboard(source, port=0).serve)
        assert (await http(bound.port, get("/api/state")))[0] == 503
        assert (await http(bound.port, get("/api/state")))[0] == 200
        nursery.cancel_scope.cancel()


def test_a_non_loopback_bind_serves_and_warns(capsys: pytest.CaptureFixture[str]) -> None:
    with serving_in_thread(a_client_snapshot, host="0.0.0.0", port=0) as bound:
        announce(bound)
        status, _, body = trio.run(http, bound.port, get("/api/state", host="192.0.2.7"))
    out, err = capsys.readouterr()
    assert status == 200 and json.loads(body)["role"] == "client"
    assert not bound.loopback and f"dashboard: http://0.0.0.0:{bound.port}/" in out
    assert "warning: the dashboard listens on 0.0.0.0, not loopback" in err


def test_a_loopback_bind_does_not_warn(capsys: pytest.CaptureFixture[str]) -> None:
    with serving_in_thread(a_client_snapshot, host="127.0.0.1", port=0) as bound:
        announce(bound)
    out, err = capsys.readouterr()
    assert bound.loopback and out == f"dashboard: http://127.0.0.1:{bound.port}/\n" and err == ""


def test_a_port_in_use_fails_before_the_block() -> None:
    with serving_in_thread(a_client_snapshot, host="127.0.0.1", port=0) as bound:
        with pytest.raises(OSError), serving_in_thread(a_client_snapshot, host="127.0.0.1", port=bound.port):
            pass


@pytest.mark.parametrize(("text", "expected"), [("8080", ("127.0.0.1", 8080)), ("0.0.0.0:0", ("0.0.0.0", 0)),
                                                ("[::1]:9000", ("::1", 9000)), ("localhost:1", ("localhost", 1))])
def test_dashboard_addresses(text: str, expected: tuple[str, int]) -> None:
    assert dashboard_address(text) == expected


@pytest.mark.parametrize("text", ["example.com:80", "127.0.0.1:70000", "127.0.0.1:x", "127.0.0.1:"])
def test_bad_dashboard_addresses(text: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError):
        dashboard_address(text)


def test_a_client_board_counts_this_runs_receipts_per_provider(tmp_path: Path) -> None:
    """Spend per provider from the ledger's countersigned receipts, those already there (an earlier
    run's) left out, keyed by the base58 peer id the peer table uses."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    from cipherswarm.node import Ledger
    from cipherswarm.node.identity import signing_key
    from cipherswarm.node.types import ClientStats
    from cipherswarm.protocol import SignedReceipt, UsageReceipt, countersign_receipt, sign_receipt
    from cipherswarm.protocol.signing import peer_id

    client = signing_key(create_new_key_pair())
    first, second = signing_key(create_new_key_pair()), signing_key(create_new_key_pair())

    def receipt(provider: Ed25519PrivateKey, request: int, price: int) -> SignedReceipt:
        body = UsageReceipt(provider=peer_id(provider.public_key()), client=peer_id(client.public_key()),
                            request_id=request.to_bytes(16, "big"), request_digest=bytes(32), reply_digest=bytes(32),
                            macs=10**9, price_per_gmac=price, completed_at_ms=1_700_000_000_000 + request)
        return countersign_receipt(sign_receipt(body, provider), client)

    path = tmp_path / "client.sqlite"
    with Ledger(path) as ledger:
        ledger.record(receipt(first, 0, 1000), layer="l")  # an earlier run's
        board = ClientBoard(stats=lambda: ClientStats(paid=17), ledger=path, steps=tuple, total_steps=2)
        for request, (provider, price) in enumerate([(first, 5), (second, 7), (first, 5)], start=1):
            ledger.record(receipt(provider, request, price), layer="l")
        doc = json.loads(board.snapshot().to_json())
    names = [ID(peer_id(key.public_key())).to_base58() for key in (first, second)]
    assert doc["spend"] == {names[0]: 10, names[1]: 7} and doc["traffic"]["paid"] == 17
    assert doc["training"] == {"total_steps": 2, "steps": []}
