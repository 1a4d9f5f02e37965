"""`pip install .` gives a working command: the wheel, installed on its own, fine-tunes the bundled
model on a JSONL chat file with `cipherswarm train` through a provider process, and the adapter it
writes loads and generates with plain peft."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from caps import time_limit

REPO = Path(__file__).resolve().parents[2]
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.mark.slow
@time_limit(90)  # 42-49 s measured on 2 busy cores
def test_the_wheel_alone_trains_on_chat_through_a_provider(tmp_path: Path) -> None:
    """The wheel is installed into an empty folder that comes first on the path, so every module of
    the run (client and provider processes alike) is the wheel's, not this checkout's; the
    dependencies are the environment's."""
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels),
                    str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(wheels.glob("cipherswarm-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {**os.environ, "PYTHONPATH": str(target), "HF_HUB_OFFLINE": "1", "CIPHERSWARM_HOME": str(tmp_path / "home"),
           "OMP_NUM_THREADS": "1"}
    where = subprocess.run([sys.executable, "-c", "import cipherswarm.cli, cipherswarm.node.client, cipherswarm.node.provider, "
                            "cipherswarm.node.sim, cipherswarm.trainer.thin; print(cipherswarm.cli.__file__)"],
                           capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert where.returncode == 0 and where.stdout.startswith(str(target)), where.stdout + where.stderr

    # the bundled model, shipped in the wheel, with a chat template
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = tmp_path / "model"
    shipped = target / "cipherswarm" / "trainer" / "assets" / "tiny-shakespeare-llama"
    AutoModelForCausalLM.from_pretrained(shipped).save_pretrained(model)
    tok = AutoTokenizer.from_pretrained(shipped)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(model)
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Who speaks in scene {i}?"},
                                                     {"role": "assistant", "content": f"The master, in scene {i}."}]}) + "\n"
                            for i in range(40)))

    cipherswarm = str(target / "bin" / "cipherswarm")  # the wheel's console script
    with open(tmp_path / "provider.log", "wb") as log:
        provider = subprocess.Popen([cipherswarm, "provider", "--model", str(model), "--identity", str(tmp_path / "provider.key"),
                                     "--benchmark-seconds", "0.1", "--advert-interval", "2"],
                                    stdout=subprocess.PIPE, stderr=log, env=env, cwd=tmp_path)
    try:
        addr = provider.stdout.readline().decode().strip()  # printed once it serves
        assert addr, (tmp_path / "provider.log").read_text()[-2000:]
        out = tmp_path / "run"
        run = subprocess.run([cipherswarm, "train", "--model", str(model), "--bootstrap", addr, "--data", str(data),
                              "--steps", "2", "--seq-len", "48", "--batch-size", "4", "--out", str(out)],
                             capture_output=True, text=True, env=env, timeout=420, cwd=tmp_path)
    finally:
        provider.terminate()
        provider.wait(10)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == 2 and report["fhe"] == "remote" and report["bytes_sent"] > 0
    samples = report["samples"]["items"]
    assert len(samples) == 3 and all(s["prompt"].endswith("<|assistant|>\n") for s in samples)
    assert "greedy samples" in run.stdout and repr(samples[0]["after"]) in run.stdout

    # the adapter is a plain peft adapter: loaded without cipherswarm, it generates
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model), out / "adapter")
    prompt = tok.apply_chat_template([{"role": "user", "content": "Who speaks in scene 3?"}], add_generation_prompt=True,
                                     return_tensors="pt", return_dict=True)
    generated = tuned.generate(**prompt, min_new_tokens=5, max_new_tokens=5, do_sample=False)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5
