"""`cipherswarm train --budget` and `cipherswarm ledger` against a real provider process.

A priced `cipherswarm provider` process with its own ledger on 127.0.0.1 and real client processes
(real libp2p, real encryption). One run goes through three sittings: a fresh start whose held-out
evaluation already spends a tiny budget (stopped before any step), a resumed sitting with a tiny
budget (stopped after its first step, which is what shows a step's cost), and a resumed sitting
without one that finishes. Then both ledgers are balanced, exported and verified, and a tampered
export must fail verification.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from caps import time_limit
import torch

from cipherswarm.cli.localswarm import start_provider
from cipherswarm.protocol import SignedReceipt, UsageReceipt
from cipherswarm.trainer.checkpoint import checkpoint_folder, latest_checkpoint
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, finetune

pytestmark = pytest.mark.slow  # three client sittings of a few seconds of training each, on top of process start-up

REPO = Path(__file__).resolve().parents[2]
STEPS = 3
PRICE = 1000  # per 10^9 MACs: a step of the tiny model costs some tens of units
BUDGET_STOP = 3
START_S = 60.0
RUN_S = 150.0  # one client sitting on 2 busy cores
SETUP_CAP_S = 90  # the provider and the three sittings: 34 s measured on 2 busy cores


@dataclass
class Run:
    out: Path
    client_ledger: Path
    provider_ledger: Path
    sittings: list[subprocess.CompletedProcess[str]]
    latest: list[str]  # after each sitting: the name of the latest checkpoint ("" for none)
    env: dict[str, str]


def _cli(*args: str, env: dict[str, str], timeout: float = RUN_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cipherswarm.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=env)


def _spent(sitting: subprocess.CompletedProcess[str]) -> int:
    found = re.search(r"this invocation spent ([\d,]+)", sitting.stderr)
    assert found, sitting.stderr[-3000:]
    return int(found.group(1).replace(",", ""))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    tmp = tmp_path_factory.mktemp("budget")
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = tmp / "model"
    LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=4, vocab_size=2048, max_position_embeddings=64, bos_token_id=0,
                                 eos_token_id=1, pad_token_id=2, tie_word_embeddings=True)).save_pretrained(model)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, model / name)
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CIPHERSWARM_HOME=str(tmp / "home"))
    provider_ledger = tmp / "provider.sqlite"
    provider = start_provider(0, model=model, run_dir=tmp, price=PRICE, benchmark_s=0.1, env=env,
                              extra_args=["--ledger", str(provider_ledger)])
    try:
        with time_limit(SETUP_CAP_S):
            addr = provider.wait_addr(START_S)
            out, client_ledger = tmp / "run", tmp / "client.sqlite"
            train = ["train", "--model", str(model), "--bootstrap", addr, "--steps", str(STEPS), "--seq-len", "32",
                     "--batch-size", "2", "--out", str(out), "--ledger", str(client_ledger), "--max-price", str(PRICE)]
            sittings, latest = [], []
            # the second sitting checkpoints every 5 steps: its checkpoint at step 1 is the budget stop's own
            for extra in (["--budget", "1"], ["--resume", "--budget", "1", "--checkpoint-every", "5"], ["--resume"]):
                sittings.append(_cli(*train, *extra, env=env))
                latest.append(latest_checkpoint(out / "checkpoints").name if (out / "checkpoints").is_dir() and any(
                    (out / "checkpoints").glob("checkpoint-*")) else "")
            # the provider records a receipt when the client's countersignature reaches it: wait for the last ones
            deadline = time.monotonic() + 30
            while _count(provider_ledger) < _count(client_ledger) and time.monotonic() < deadline:
                time.sleep(0.1)
        yield Run(out, client_ledger, provider_ledger, sittings, latest, env)
    finally:
        provider.stop()


def _count(ledger: Path) -> int:
    with sqlite3.connect(f"file:{ledger}?mode=ro", uri=True) as db:
        return int(db.execute("SELECT COUNT(*) FROM receipts").fetchone()[0])


@time_limit(30)  # 3 s measured (the sittings ran in the fixture)
def test_a_tiny_budget_stops_cleanly_and_resume_continues_to_the_uninterrupted_result(run: Run) -> None:
    fresh, resumed, finished = run.sittings
    checkpoints = run.out / "checkpoints"
    # The held-out evaluation before training already spent more than 1: stopped before any step.
    assert fresh.returncode == BUDGET_STOP, fresh.stderr[-3000:]
    assert "after step 0 of 3" in fresh.stderr and "--resume --budget" in fresh.stderr and "Traceback" not in fresh.stderr
    assert _spent(fresh) > 1 and "wrote" not in fresh.stdout  # no adapter or report of an unfinished run
    assert run.latest[0] == ""
    # Resumed with a tiny budget: the first step is taken (its cost is unknown until paid), then the
    # second, estimated at the first's cost, would exceed it: stopped after step 1, checkpointed.
    assert resumed.returncode == BUDGET_STOP, resumed.stderr[-3000:]
    assert "after step 1 of 3: step 2 would cost about" in resumed.stderr
    assert run.latest[1] == checkpoint_folder(checkpoints, 1).name  # taken at the stop
    assert f"checkpoint {checkpoint_folder(checkpoints, 1)}" in resumed.stderr
    step_cost = _spent(resumed)  # no evaluation in a resumed sitting: one step's receipts
    assert re.search(rf"step 2 would cost about {step_cost:,}\b", resumed.stderr)
    # Without a budget, the last sitting goes on from that checkpoint to the end.
    assert finished.returncode == 0, finished.stdout[-3000:] + finished.stderr[-3000:]
    assert "resumed at step 1" in finished.stdout and run.latest[2] == checkpoint_folder(checkpoints, STEPS).name
    report = json.loads((run.out / "report.json").read_text())
    assert report["resumed_at_step"] == 1 and report["steps"] == STEPS and report["paid"] > 0
    # Nothing was lost or done twice across the stops: the uninterrupted run's losses, bit for bit.
    reference = finetune(FinetuneConfig(model_dir=run.out.parent / "model", steps=STEPS, seq_len=32, batch_size=2),
                         fhe="simulate", progress=False)
    assert report["losses"] == reference.losses and report["eval_loss_after"] == reference.eval_after

    # The ledger's client balances are what each sitting said it spent (a fresh client key per sitting).
    balances = json.loads(_cli("ledger", "--ledger", str(run.client_ledger), "--format", "json", env=run.env).stdout)
    spent = sorted(b["amount"] for b in balances["balances"] if b["role"] == "client")
    assert spent == sorted([_spent(fresh), step_cost, report["paid"]])


@time_limit(60)  # 22 s measured on 2 busy cores
def test_ledger_balances_exports_verify_and_a_tampered_export_fails(run: Run, tmp_path: Path) -> None:
    views = {}
    for side, ledger in (("client", run.client_ledger), ("provider", run.provider_ledger)):
        shown = _cli("ledger", "--ledger", str(ledger), "--format", "json", env=run.env, timeout=60)
        assert shown.returncode == 0, shown.stderr
        views[side] = json.loads(shown.stdout)
    with sqlite3.connect(f"file:{run.client_ledger}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT receipt, provider_signature, client_signature FROM receipts").fetchall()
    receipts = [SignedReceipt(receipt_bytes=r, provider_signature=p, client_signature=c).receipt for r, p, c in rows]
    total = sum(r.amount for r in receipts)
    assert receipts and all(r.price_per_gmac == PRICE for r in receipts)
    for view in views.values():  # both sides agree, and with the sum of the countersigned receipts
        assert view["rejected"] == [] and view["earned"] == view["spent"] == total
    assert views["client"]["balances"] == views["provider"]["balances"]

    exported = tmp_path / "receipts.json"
    assert _cli("ledger", "export", str(exported), "--ledger", str(run.provider_ledger), env=run.env,
                timeout=60).returncode == 0
    ok = _cli("ledger", "verify", str(exported), env=run.env, timeout=60)
    assert ok.returncode == 0 and f"{len(receipts)} of {len(receipts)} receipt(s) verified" in ok.stdout, ok.stdout
    csv_file = tmp_path / "receipts.csv"
    assert _cli("ledger", "export", str(csv_file), "--ledger", str(run.provider_ledger), env=run.env,
                timeout=60).returncode == 0
    assert _cli("ledger", "verify", str(csv_file), env=run.env, timeout=60).returncode == 0

    # Charge twice the MACs on one receipt, its readable fields made consistent: only the signatures tell.
    data = json.loads(exported.read_text())
    row = data["receipts"][0]
    signed = UsageReceipt.from_bytes(bytes.fromhex(row["receipt"]))
    forged = replace(signed, macs=2 * signed.macs)
    row.update(receipt=forged.to_bytes().hex(), macs=forged.macs, amount=forged.amount)
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    bad = _cli("ledger", "verify", str(tampered), env=run.env, timeout=60)
    assert bad.returncode == 1, bad.stdout
    assert f"receipt {row['request_id']}: signature does not verify" in bad.stdout
    assert f"{len(receipts) - 1} of {len(receipts)} receipt(s) verified, 1 failed" in bad.stdout
