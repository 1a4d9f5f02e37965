"""The one-command benchmark runs end to end (small shapes): every part, real provider processes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _bench(script: str, *args: str, timeout: float = 600) -> str:
    """The standard output of ``bench/<script> args``, which must exit 0 within ``timeout``."""
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_all_benchmarks_run_in_one_command() -> None:
    out = _bench("all.py", "--quick", timeout=130)  # 100 s measured on 2 busy cores
    exact = [line for line in out.splitlines() if line.strip().startswith("exact (decrypt(matmul(encrypt(x))) == x @ w)")]
    assert len(exact) == 2 and all("True" in line for line in exact)  # both encryption profiles
    summary = out[out.index("\nsummary ("):]
    for row in ("provider encrypted / plain fp32 MAC/s, default", "client encrypt+decrypt+verify / plain fp32 layer",
                "bytes per value in / out", "training step swarm[3] / disable, 2048 tokens",
                "one layer through 3 provider(s) on one machine"):
        assert row in summary, row


@pytest.mark.slow
def test_client_memory_runs_every_part(tmp_path: Path) -> None:
    """bench/client_memory.py --quick: writes its checkpoint tensor by tensor, measures (a), (b) and (c)."""
    out = _bench("client_memory.py", "--quick", "--cache", str(tmp_path), "--tokens", "128", timeout=90)  # 56 s measured
    for part in ("(a) RSS after load + prepare", "(b) client-held state per remote base weight", "(c) one remote step"):
        assert part in out, part
    per_weight = float(out.split("(b) client-held state per remote base weight: ")[1].split(" B")[0])
    assert 0 < per_weight <= 0.5


@pytest.mark.slow
def test_accuracy_bench_prints_its_table(tmp_path: Path) -> None:
    """bench/accuracy.py --quick: converts the packaged GGUF, prints the table and a short fine-tune."""
    out = _bench("accuracy.py", "--quick", "--cache", str(tmp_path), "--finetune-steps", "2", timeout=400)  # 307 s measured
    table = out[out.index("held-out tokens"):out.index("\nprovider:")]
    rows = [line.split() for line in table.splitlines() if line.strip().startswith(("8/8/8", "14/8/11"))]
    assert [r[0] for r in rows] == ["8/8/8", "14/8/11"]
    top1 = {r[0]: float(r[2].rstrip("%")) for r in rows}
    assert top1["14/8/11"] > top1["8/8/8"]
    assert "x the first row" in out and "held-out loss  plain" in out


@pytest.mark.slow
def test_market_bench_prints_each_preference(tmp_path: Path) -> None:
    """bench/market.py on two one-step testnets: a row per preference, shares summing to 1, the saving line."""
    out = _bench("market.py", "--steps", "1", "--prefer", "price", "speed", "--out", str(tmp_path), timeout=130)  # 96 s measured
    rows = {r[0]: r for r in (line.split() for line in out.splitlines()) if r and r[0] in ("price", "speed")}
    assert set(rows) == {"price", "speed"}
    for r in rows.values():
        assert int(r[1]) > 0 and float(r[3]) > 0  # tokens, price per 1k tokens from the receipts
        assert sum(int(share.rstrip("%")) for share in r[7:10]) in range(98, 103)  # rounded shares of the chunks
    assert "less per 1k tokens than --prefer speed" in out


def test_ledger_bench_measures_both_levels(tmp_path: Path) -> None:
    out = _bench("ledger.py", "--rows", "20", "--dir", str(tmp_path), timeout=120)
    assert "synchronous=FULL" in out and "FULL / NORMAL" in out


def test_bytes_bench_shows_what_short_micro_batches_save() -> None:
    """bench/bytes.py on the bundled model: a full block costs what it did, a short one less than padded."""
    out = _bench("bytes.py", "--model", "tiny", timeout=300)
    rows = {int(r[0]): r for r in (line.split() for line in out.splitlines()) if r and r[0].isdigit()}
    assert set(rows) == {64, 256, 1024, 2048, 4096, 8192}
    assert rows[2048][4] == "1.00x" and rows[2048][6] == "0.0%"  # a whole block: nothing was padding
    total, padded = float(rows[256][3]), float(rows[256][5])
    assert total < padded and float(rows[256][6].rstrip("%")) > 50  # the padding's B words stay home
