"""What a run writes: the held-out loss beside the training loss, the accuracy line, and the greedy
samples before and after."""

from __future__ import annotations

from pathlib import Path

from cipherswarm.cli.runs import accuracy_line, held_out_curve, plot_losses, report, sample_lines
from cipherswarm.trainer.finetune import FinetuneConfig, finetune


def test_held_out_loss_is_plotted_where_it_was_measured(tmp_path: Path) -> None:
    config = FinetuneConfig(steps=12, batch_size=2, seq_len=32, eval_batches=1)
    result = finetune(config, fhe="simulate", progress=False)
    steps, losses = held_out_curve(result)
    assert steps == [0, 10, 12]  # before, the trainer's evaluation every eval_steps (10), after
    assert losses[0] == result.eval_before and losses[-1] == result.eval_after
    assert losses[1] == next(r.eval["eval_loss"] for r in result.records if r.step == 10 and r.eval)
    plot_losses(tmp_path / "loss.png", result, None)
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert accuracy_line(result).startswith("quantization (14-bit activations, 8-bit gradients, 11-bit weights): on the first batch logits")
    # the samples: one per held-out prompt evaluated (one batch of 2 here), in the report and on the terminal
    summary = report(result)
    assert summary["task"] == "causal-lm" and summary["samples"]["fhe"] == "disable"
    items = summary["samples"]["items"]
    assert len(items) == 2 and all(item["prompt"] and item["after"] for item in items)
    lines = sample_lines(result)
    assert lines[0].startswith("greedy samples") and len(lines) == 1 + 3 * 2 and repr(items[1]["after"]) in lines[-1]
