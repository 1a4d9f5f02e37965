"""`cipherswarm train` killed mid-run and resumed: nothing lost, nothing done twice.

A real provider process on 127.0.0.1 and a real client process: the client is SIGKILLed once it has
checkpointed a step, then run again with --resume. Products are exact, so an uninterrupted
``fhe="simulate"`` run of the same config is the reference, bit for bit: losses, held-out losses
and the adapter weights (a step applied twice would change them).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from cipherswarm.cli.localswarm import start_provider
from cipherswarm.trainer.checkpoint import RUN_FILE, STATE_FILE, checkpoint_folder, latest_checkpoint
from cipherswarm.trainer.finetune import BUNDLED_MODEL, FinetuneConfig, ResumeError, finetune

REPO = Path(__file__).resolve().parents[2]
STEPS = 4
START_S = 60.0  # a process imports torch and transformers: generous on 2 busy cores
RUN_S = 120.0  # one client sitting


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-block LLaMA (hidden 64) with the bundled tokenizer: a remote step takes about a second."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=2048, max_position_embeddings=64, bos_token_id=0,
                         eos_token_id=1, pad_token_id=2, tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(BUNDLED_MODEL / name, path / name)
    return path


def _env(home: Path) -> dict[str, str]:
    """Offline, one thread per process, and the client's default files under ``home``, not ~."""
    return dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", CIPHERSWARM_HOME=str(home))


@pytest.fixture(scope="module")
def provider(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `cipherswarm provider` process, started as the testnet starts them; yields the multiaddr
    it prints once serving."""
    tmp = tmp_path_factory.mktemp("provider")
    process = start_provider(0, model=tiny_model, run_dir=tmp, price=0, benchmark_s=0.1, env=_env(tmp))
    try:
        yield process.wait_addr(START_S)
    finally:
        process.stop()


def _train(model: Path, addr: str, out: Path, *extra: str) -> list[str]:
    """The client's command line: a few small steps, so that a sitting takes seconds."""
    return [sys.executable, "-m", "cipherswarm.cli", "train", "--model", str(model), "--bootstrap", addr,
            "--steps", str(STEPS), "--seq-len", "32", "--batch-size", "2", "--out", str(out),
            "--ledger", str(out.parent / "client.sqlite"), *extra]


def _kill_after_first_checkpoint(command: list[str], out: Path, env: dict[str, str]) -> int:
    """Run the client until it has checkpointed step 1, SIGKILL it; the latest step saved."""
    first = checkpoint_folder(out / "checkpoints", 1) / STATE_FILE
    with open(out.parent / "first.log", "wb") as log:
        process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        deadline = time.monotonic() + RUN_S
        while not first.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, (out.parent / "first.log").read_text()[-3000:]  # still training
        assert first.exists(), "no checkpoint of step 1 in time"
        process.send_signal(signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)
    assert process.returncode == -signal.SIGKILL
    return int(latest_checkpoint(out / "checkpoints").name.split("-")[1])


def test_train_killed_after_a_checkpoint_resumes_to_the_uninterrupted_result(
    tiny_model: Path, provider: str, tmp_path: Path
) -> None:
    out, env = tmp_path / "run", _env(tmp_path)
    out.mkdir()
    saved = _kill_after_first_checkpoint(_train(tiny_model, provider, out), out, env)
    assert 1 <= saved < STEPS and not (out / "report.json").exists()

    done = subprocess.run(_train(tiny_model, provider, out, "--resume"), cwd=REPO, capture_output=True, text=True,
                          timeout=RUN_S, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"resumed at step {saved}" in done.stdout
    report = json.loads((out / "report.json").read_text())
    assert report["resumed_at_step"] == saved and report["steps"] == STEPS
    assert latest_checkpoint(out / "checkpoints") == checkpoint_folder(out / "checkpoints", STEPS)
    assert report["chunks"] > 0  # the second sitting's products came from the provider

    reference = finetune(FinetuneConfig(model_dir=tiny_model, steps=STEPS, seq_len=32, batch_size=2), fhe="simulate",
                         progress=False)
    assert report["losses"] == reference.losses
    assert report["eval_loss_before"] == reference.eval_before  # the first sitting's (the next test: not recomputed)
    assert report["eval_loss_after"] == reference.eval_after
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    expected = get_peft_model_state_dict(reference.trainer.model)
    assert adapter.keys() == expected.keys()
    assert all(torch.equal(adapter[k], expected[k]) for k in expected)

    # Another config's checkpoints are refused, before joining the swarm, without a traceback.
    other = subprocess.run([*_train(tiny_model, provider, out, "--resume"), "--seq-len", "16"], cwd=REPO,
                           capture_output=True, text=True, timeout=RUN_S, env=env)
    assert other.returncode == 1 and "seq_len: 32 -> 16" in other.stderr and "Traceback" not in other.stderr


def test_a_resumed_finetune_keeps_its_first_held_out_loss_and_refuses_other_runs(tiny_model: Path, tmp_path: Path) -> None:
    config = FinetuneConfig(model_dir=tiny_model, steps=2, seq_len=32, batch_size=2)
    checkpoints = tmp_path / "checkpoints"
    full = finetune(config, fhe="simulate", progress=False, checkpoint_dir=checkpoints)
    record = json.loads((checkpoints / RUN_FILE).read_text())
    assert record["eval_before"] == full.eval_before
    # A marker value shows where the resumed run's "before" figure comes from: the record, not a new evaluation.
    (checkpoints / RUN_FILE).write_text(json.dumps({**record, "eval_before": 1.5}))
    shutil.rmtree(checkpoint_folder(checkpoints, 2))
    resumed = finetune(config, fhe="simulate", progress=False, checkpoint_dir=checkpoints, resume=True)
    assert resumed.eval_before == 1.5 and resumed.resumed_at == 1
    assert resumed.losses == full.losses and resumed.eval_after == full.eval_after

    with pytest.raises(ResumeError, match="fhe: 'simulate' -> 'disable'"):
        finetune(config, fhe="disable", checkpoint_dir=checkpoints, resume=True)
    # A fresh start over them is refused too: the trainer would resume from the higher, older checkpoints.
    with pytest.raises(ResumeError, match="earlier fine-tune"):
        finetune(config, fhe="simulate", checkpoint_dir=checkpoints)
    with pytest.raises(ResumeError, match="nothing to resume"):
        finetune(config, fhe="simulate", checkpoint_dir=tmp_path / "empty", resume=True)
