"""`pip install .` gives a working command: the wheel, installed on its own, fine-tunes on a JSONL
file through a local swarm, and the adapter it writes loads and generates with plain peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_the_wheel_alone_runs_a_testnet(tmp_path: Path) -> None:
    """The wheel is installed into an empty folder that comes first on the path, so every module of
    the run (client and provider processes alike) is the wheel's, not this checkout's; the
    dependencies are the environment's."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("cipherswarm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "CIPHERSWARM_HOME": str(tmp_path / "home")}
    where = subprocess.run([sys.executable, "-c", "import cipherswarm.cli, cipherswarm.node.client, cipherswarm.node.provider, "
                            "cipherswarm.node.sim, cipherswarm.trainer.thin; print(cipherswarm.cli.__file__)"],
                           capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(target)), where.stdout + where.stderr
    out, data = tmp_path / "run", tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"Who speaks in scene {i}? ", "completion": f"The master, in scene {i}."}) + "\n"
                            for i in range(40)))
    run = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "testnet", "--providers", "1", "--steps", "2",
                          "--no-compare", "--data", str(data), "--out", str(out)],
                         capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["model"].startswith(str(target))  # the bundled model shipped in the wheel

    # the adapter is a plain peft adapter: loaded without cipherswarm, it generates
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(report["model"])
    tuned = PeftModel.from_pretrained(base, out / "adapter")
    tok = AutoTokenizer.from_pretrained(report["model"])
    prompt = tok("Who speaks in scene 3? ", return_tensors="pt")
    generated = tuned.generate(**prompt, min_new_tokens=5, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
