"""The README's main command, end to end: real provider processes on 127.0.0.1, one of them cheating
and one killed halfway, the client fine-tuning the bundled model through them."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cipherswarm.trainer.finetune import FinetuneConfig, finetune


def test_testnet_bans_a_cheater_survives_a_crash_and_matches_simulate(tmp_path: Path) -> None:
    out = tmp_path / "run"
    steps = 2
    cmd = [sys.executable, "-m", "cipherswarm.cli", "testnet", "--providers", "3", "--steps", str(steps),
           "--malicious", "1", "--cheat", "flip", "--kill-one", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    cheater = next(p for p in report["providers"] if p["cheat"])
    killed = [p for p in report["providers"] if p["killed"]]
    assert cheater["peer"] in report["bans"] and "wrong result" in report["bans"][cheater["peer"]]
    assert report["verification_failures"] >= 1 and report["key_rotations"] >= 1
    assert len(killed) == 1 and not killed[0]["cheat"]
    assert report["steps"] == steps and report["tokens"] == steps * 16 * 128
    assert report["paid"] > 0 and report["provider_macs"] > 0 and report["bytes_sent"] > 0
    cpu = report["client_cpu_s"]  # the client's crypto, measured in its worker threads
    assert cpu["encrypt"] > 0 and cpu["decrypt"] > 0 and cpu["verify"] > 0 and cpu["serialise"] > 0
    # every product is exact, so whoever computed it, the losses are those of the clear integer run
    simulate = finetune(FinetuneConfig(steps=steps), fhe="simulate", progress=False)
    assert report["losses"] == simulate.losses
    assert report["eval_loss_after"] == simulate.eval_after
    # and they track the plaintext run of the same seed
    assert report["final_loss_difference_pct"] < 1.0
    # compile()'s check of the quantized model on the first batch, at the default precision
    assert report["precision"] == {"forward_bits": 14, "backward_bits": 8, "weight_bits": 11}
    assert report["accuracy"]["top1_agreement"] >= 0.99 and 0 < report["accuracy"]["max_layer_error"] < 0.02
    assert "quantization (14-bit activations, 8-bit gradients, 11-bit weights): on the first batch logits" in proc.stdout
    assert (out / "loss.png").stat().st_size > 10_000
    assert (out / "adapter" / "adapter_model.safetensors").exists()


def _processes_naming(text: str) -> list[int]:
    """Pids of the live processes whose command line contains `text` (Linux /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                pids.append(int(entry.name))
        except OSError:  # it ended while being read
            continue
    return pids


def test_sigterm_stops_the_testnet_and_its_providers(tmp_path: Path) -> None:
    """A testnet stopped by SIGTERM (a service manager, a CI job's cancellation) stops its provider
    processes, as Ctrl-C does: none is left running with nobody to stop it."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "cipherswarm.cli", "testnet", "--providers", "2", "--steps", "50", "--no-compare",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # both providers serve once the second one's address is printed
            if line.startswith("  provider 1:"):
                break
        providers = _processes_naming(str(out / "swarm"))
        assert len(providers) == 2, providers
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    err = proc.stderr.read()  # type: ignore[union-attr]
    assert proc.returncode == 130 and "interrupted: stopping providers" in err, err[-3000:]
    assert _processes_naming(str(out / "swarm")) == []


def test_sigterm_is_remembered_whatever_exception_it_surfaces_as() -> None:
    """SIGTERM raised inside a native extension's callback can come back as that extension's own
    error (safetensors turned one into a ValueError while the testnet loaded its model, so the
    testnet exited 1 instead of 130). The launcher keeps the fact that SIGTERM arrived, and
    SIGTERM outside the block is back to its previous handler."""
    from cipherswarm.cli.localswarm import terminate_as_interrupt

    before = signal.getsignal(signal.SIGTERM)
    with terminate_as_interrupt() as termination:
        assert not termination.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler runs at the next bytecode; this is never reached
        assert termination.requested
    assert signal.getsignal(signal.SIGTERM) is before


def test_testnet_refuses_all_malicious(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "testnet", "--providers", "2", "--malicious", "2",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "honest provider" in proc.stderr


@pytest.mark.parametrize("command", ["testnet", "train", "provider", "estimate", "status", "identity", "demo", "convert"])
def test_every_subcommand_has_help(command: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", command, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage: cipherswarm " + command in proc.stdout


@pytest.mark.parametrize(("command", "flag"), [("provider", "--weight-bits"), ("train", "--forward-bits"),
                                             ("testnet", "--backward-bits"), ("estimate", "--weight-bits")])
def test_bit_widths_out_of_range_are_usage_errors(command: str, flag: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", command, flag, "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"argument {flag}: must be in" in proc.stderr


def test_bad_model_path_is_a_clear_error(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "provider", "--model", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "is neither a model folder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_second_provider_on_one_identity_is_refused(tmp_path: Path) -> None:
    """Two providers started as the README shows would otherwise be one peer id to the swarm."""
    from cipherswarm.cli.localswarm import start_provider
    from cipherswarm.trainer.finetune import BUNDLED_MODEL

    first = start_provider(0, model=BUNDLED_MODEL, run_dir=tmp_path)
    try:
        first.wait_addr(120)
        proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "provider", "--model", str(BUNDLED_MODEL),
                               "--listen", "/ip4/127.0.0.1/tcp/0", "--identity", str(tmp_path / "provider0.key")],
                              capture_output=True, text=True, timeout=120)
    finally:
        first.stop()
    assert proc.returncode == 1 and "is the identity of another running node" in proc.stderr, proc.stderr[-2000:]
    assert "--identity FILE" in proc.stderr and "Traceback" not in proc.stderr


def test_port_in_use_is_a_clear_error() -> None:
    """libp2p binds with SO_REUSEPORT: without the check a second provider would share the port."""
    import socket

    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "cipherswarm.cli", "provider", "--model", "unused",
                               "--listen", f"/ip4/127.0.0.1/tcp/{port}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and f"port {port} is in use" in proc.stderr
