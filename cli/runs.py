"""What a fine-tune run leaves behind: adapters, a loss plot and a JSON report (train and testnet)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from cipherswarm.trainer.finetune import SAMPLE_TOKENS, SAMPLES_EXECUTOR, FinetuneResult


def client_cpu(result: FinetuneResult) -> dict[str, Any]:
    """The client's CPU seconds over all steps: the total, then each measured part (StepRecord's
    docstring names them) largest first, then what no part claims, also as a share of the total."""
    records = result.records
    total = sum(r.cpu_s for r in records)
    parts: dict[str, float] = {}
    for r in records:
        for name, seconds in (r.cpu_parts or {}).items():
            parts[name] = parts.get(name, 0.0) + seconds
    unnamed = sum(r.cpu_unnamed_s for r in records)
    return {
        "total": round(total, 3),
        **{name: round(s, 3) for name, s in sorted(parts.items(), key=lambda kv: -kv[1])},
        "unnamed": round(unnamed, 3),
        "unnamed_share": round(unnamed / total, 4) if total else None,
    }


def accuracy_line(result: FinetuneResult) -> str:
    """One line for the terminal: the bit widths and how far they left the model from float."""
    accuracy = result.trainer.accuracy
    measured = "not measured" if accuracy is None else f"on the first batch {accuracy}"
    return f"quantization ({result.config.precision}): {measured}"


def report(result: FinetuneResult, *, swarm: Any = None, plain: FinetuneResult | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-able summary of ``result``; ``swarm`` is the node client's stats, ``plain`` a
    plaintext run of the same config to compare with."""
    tokens = result.tokens
    out: dict[str, Any] = {
        "model": str(result.config.model_dir),
        "task": result.task,
        "fhe": result.fhe,
        "steps": len(result.losses),
        "tokens": tokens,
        "seconds": round(result.wall_s, 2),
        "tokens_per_second": round(tokens / result.wall_s, 2) if result.wall_s else None,
        "losses": result.losses,
        "eval_loss_before": result.eval_before,
        "eval_loss_after": result.eval_after,
        "client_cpu_s": client_cpu(result),
        "bytes_sent": (sent := sum(r.bytes_sent for r in result.records)),
        "bytes_received": (received := sum(r.bytes_received for r in result.records)),
        # what the client's link carries per training token: the figure that sets a fine-tune's time
        "bytes_sent_per_token": round(sent / tokens, 1) if tokens else None,
        "bytes_received_per_token": round(received / tokens, 1) if tokens else None,
        "precision": {"forward_bits": result.config.forward_bits, "backward_bits": result.config.backward_bits,
                      "weight_bits": result.config.weight_bits},
        # the quantized model against the float one on the first training batch (trainer/accuracy.py)
        "accuracy": None if result.trainer.accuracy is None else result.trainer.accuracy.as_dict(),
    }
    if result.samples is not None:
        out["samples"] = {
            # generated in plaintext in this process from the same weights: what the adapter changed
            "fhe": SAMPLES_EXECUTOR, "decoding": "greedy", "max_new_tokens": SAMPLE_TOKENS,
            "adapter": "before: as initialised (the base model's output); after: as trained", "items": result.samples,
        }
    if swarm is not None:
        out.update({
            "provider_macs": swarm.macs,
            "paid": swarm.paid,
            "price_per_1k_tokens": round(swarm.paid * 1000 / tokens, 4) if tokens else None,
            "chunks": swarm.chunks,
            "chunks_by_provider": dict(swarm.chunks_by_peer),
            "failures_by_provider": dict(swarm.failures_by_peer),
            "retries": swarm.retries,
            "hedges": swarm.hedges,
            "timeouts": swarm.timeouts,
            "busy": swarm.busy,
            "verification_failures": swarm.verification_failures,
            "key_rotations": swarm.key_rotations,
            "bans": dict(swarm.bans),
        })
    if plain is not None:
        final, final_plain = result.losses[-1], plain.losses[-1]
        out["plaintext"] = {
            "losses": plain.losses,
            "eval_loss_before": plain.eval_before,
            "eval_loss_after": plain.eval_after,
            "seconds": round(plain.wall_s, 2),
        }
        out["final_loss_difference_pct"] = round(100 * abs(final - final_plain) / abs(final_plain), 3)
        out["privacy_overhead_x"] = round(result.wall_s / plain.wall_s, 1) if plain.wall_s else None
    out.update(extra or {})
    return out


def sample_lines(result: FinetuneResult) -> list[str]:
    """The greedy samples before and after fine-tuning, for the terminal (none for an encoder)."""
    if not result.samples:
        return []
    lines = [f"greedy samples, {SAMPLE_TOKENS} new tokens at most (fhe={SAMPLES_EXECUTOR}: plaintext here, "
             "the LoRA adapter before and after fine-tuning):"]
    for item in result.samples:
        lines += [f"  prompt: {item['prompt']!r}", f"    before: {item['before']!r}", f"    after:  {item['after']!r}"]
    return lines


def save(out_dir: Path, result: FinetuneResult, summary: dict[str, Any], *, plain: FinetuneResult | None = None) -> None:
    """Write ``adapter/`` (peft), ``loss.png`` and ``report.json`` into ``out_dir``; forget the keys."""
    out_dir.mkdir(parents=True, exist_ok=True)
    result.trainer.save_and_clear_private_info(out_dir / "adapter")
    plot_losses(out_dir / "loss.png", result, plain)
    (out_dir / "report.json").write_text(json.dumps(summary, indent=2) + "\n")


def held_out_curve(result: FinetuneResult) -> tuple[list[int], list[float]]:
    """(optimizer steps, held-out losses): before training (step 0), at the trainer's evaluations,
    and after the last step."""
    points = {0: result.eval_before}
    points.update({r.step: r.eval["eval_loss"] for r in result.records if r.eval and "eval_loss" in r.eval})
    points[len(result.losses)] = result.eval_after
    steps = sorted(points)
    return steps, [points[s] for s in steps]


def plot_losses(path: Path, result: FinetuneResult, plain: FinetuneResult | None) -> None:
    """Training loss per step and held-out loss where measured, encrypted and (if given) plaintext."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    steps = range(1, len(result.losses) + 1)
    ax.plot(steps, result.losses, marker="o", color="tab:blue", alpha=0.6, label=f"training, encrypted (fhe={result.fhe})")
    ax.plot(*held_out_curve(result), marker="s", color="tab:green", linewidth=2, label="held-out, encrypted")
    if plain is not None:
        ax.plot(range(1, len(plain.losses) + 1), plain.losses, linestyle="--", marker="x", color="tab:orange", alpha=0.6,
                label="training, plaintext, same seed")
        ax.plot(*held_out_curve(plain), linestyle="--", marker="D", color="tab:red", label="held-out, plaintext")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(f"LoRA fine-tune of {Path(result.config.model_dir).name}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
