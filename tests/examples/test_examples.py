"""The examples that need no GPU, run as a user would run them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def run_example(name: str, *args: str, timeout: float = 600) -> str:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / name), *args], capture_output=True, text=True,
                          timeout=timeout, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def test_python_api_end_to_end(tmp_path: Path) -> None:
    out = run_example("python_api.py", "--steps", "1", "--out", str(tmp_path / "adapter"))
    assert "encrypted fine-tune: loss" in out and "PROSPERO:" in out
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()


def test_concrete_ml_walkthrough(tmp_path: Path) -> None:
    out = run_example("concrete_ml_walkthrough.py", "--steps", "1", "--checkpoints", str(tmp_path / "ckpt"))
    assert "simulate == execute on a batch: True" in out and "losses: [" in out


def test_run_provider_serves_and_prints_its_address() -> None:
    proc = subprocess.Popen([sys.executable, str(ROOT / "examples" / "run_provider.py"), "--log-level", "WARNING"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV, cwd=ROOT)
    try:
        line = proc.stdout.readline()
        assert line.startswith("/ip4/127.0.0.1/tcp/") and "/p2p/12D3KooW" in line
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_finetune_client_needs_bootstrap() -> None:
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "finetune_client.py")], capture_output=True,
                          text=True, timeout=120, env=ENV, cwd=ROOT)
    assert proc.returncode == 2 and "bootstrap" in proc.stderr
