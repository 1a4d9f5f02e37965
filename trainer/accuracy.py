"""How far the encrypted computation is from plaintext, measured by ``compile()`` on its inputset.

The encrypted products are exact integers, so every difference from the float model comes from
quantization (weights per output channel, activations per token). That error depends on the
model's weights and activations, not on the scheme: a real pretrained LLM has a few activation
channels with huge magnitudes, and its layers compound each other's errors. So ``compile()`` runs
the inputset twice - the float model, then the quantized products computed exactly in the clear
(``simulate``'s integers) - and reports:

- per remote layer: the relative L2 error of its outputs against the float product of the same
  input (its own quantization error, not what earlier layers did to its input);
- for the whole model, when it returns logits: their relative L2 error, the top-1 agreement of
  the next-token predictions, and the relative change of the loss.

Both forwards run in eval mode without gradients, on at most ``MAX_TOKENS`` tokens of the inputset
(whole sequences): their cost is two plain forwards of those (a thin model reads each layer from
disk for them, one at a time), and the memory two sets of their logits in the model's dtype, which
at LLaMA-3's 128k vocabulary is 0.5 GB each at 1024 tokens in float32.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch

from .executor import MatmulExecutor
from .layers import RemoteContext

#: the check runs on the first sequences of the inputset that hold at most this many tokens (at least one)
MAX_TOKENS = 1024
#: compile() warns when a layer's relative error exceeds this ...
LAYER_ERROR_WARN = 0.02
#: ... or the model's next-token top-1 agreement with the float model falls below this
TOP1_WARN = 0.99


class AccuracyWarning(UserWarning):
    """The quantized model departs from the float model by more than the thresholds above."""


@dataclass(frozen=True)
class AccuracyReport:
    """The encrypted-vs-plaintext error on the inputset (see the module docstring)."""

    tokens: int  # tokens the figures are over (attention-mask ones)
    layers: dict[str, float]  # layer key -> relative L2 error of its outputs
    logits_rel_error: float | None = None  # None: the model returns no logits
    top1_agreement: float | None = None
    loss_rel_change: float | None = None  # (quantized loss - float loss) / float loss

    @property
    def worst_layers(self) -> list[tuple[str, float]]:
        """Layers by error, worst first."""
        return sorted(self.layers.items(), key=lambda kv: -kv[1])

    def problems(self) -> list[str]:
        """What exceeds the warning thresholds, in words; empty when nothing does."""
        out = []
        bad = [(k, e) for k, e in self.worst_layers if e > LAYER_ERROR_WARN]
        if bad:
            shown = ", ".join(f"{k} {e:.1%}" for k, e in bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
            out.append(f"{len(bad)} layer(s) above {LAYER_ERROR_WARN:.0%} relative error: {shown}")
        if self.top1_agreement is not None and self.top1_agreement < TOP1_WARN:
            out.append(f"next-token top-1 agreement with the float model is {self.top1_agreement:.1%} (< {TOP1_WARN:.0%}), "
                       f"logits differ by {self.logits_rel_error:.1%}")
        return out

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready figures (report.json, training.log)."""
        d = asdict(self)
        d["worst_layers"] = dict(self.worst_layers[:5])
        del d["layers"]
        d["max_layer_error"] = max(self.layers.values(), default=0.0)
        d["mean_layer_error"] = sum(self.layers.values()) / max(len(self.layers), 1)
        return d

    def __str__(self) -> str:
        model = "" if self.logits_rel_error is None else (
            f"logits {self.logits_rel_error:.2%} from float, top-1 agreement {self.top1_agreement:.2%}, "
            f"loss {self.loss_rel_change:+.2%}; ")
        worst = self.worst_layers[0] if self.layers else ("-", 0.0)
        return f"{model}worst layer {worst[0]} {worst[1]:.2%} over {self.tokens} tokens"


def measure(
    model: torch.nn.Module,
    context: RemoteContext,
    executor: MatmulExecutor,
    ids: torch.Tensor,
    mask: torch.Tensor | None,
    labels: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> AccuracyReport:
    """Run the float and the quantized forward of one batch and compare them (module docstring)."""
    rows = max(1, MAX_TOKENS // max(ids.shape[-1], 1))
    ids, labels = ids[:rows], labels[:rows]
    mask = None if mask is None else mask[:rows]
    was_training, previous = model.training, context.executor
    device = next(model.parameters()).device
    kwargs = {"input_ids": ids.to(device), "attention_mask": None if mask is None else mask.to(device)}
    errors: dict[str, list[float]] = {}
    try:
        model.eval()
        with torch.no_grad():
            context.executor = None
            ref = getattr(model(**kwargs), "logits", None)
            context.executor, context.errors = executor, errors
            got = getattr(model(**kwargs), "logits", None)
    finally:
        context.executor, context.errors = previous, None
        model.train(was_training)
    layers = {k: math.sqrt(e / r) if r > 0 else 0.0 for k, (e, r) in errors.items()}
    real = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
    if ref is None or got is None or ref.ndim != 3:  # not a language model's (batch, tokens, vocab)
        return AccuracyReport(tokens=int(real.sum()), layers=layers)
    ref, got, keep = ref.cpu(), got.cpu(), real.cpu()
    diff2 = ref2 = agree = 0.0
    for row in range(ref.shape[0]):  # a sequence at a time in float64: no float64 copy of all the logits
        r, g = ref[row][keep[row]].double(), got[row][keep[row]].double()
        diff2 += float((g - r).square().sum())
        ref2 += float(r.square().sum())
        agree += float((g.argmax(-1) == r.argmax(-1)).sum())
    tokens = int(keep.sum())
    base_loss = float(loss_fn(ref, labels))
    return AccuracyReport(
        tokens=tokens,
        layers=layers,
        logits_rel_error=math.sqrt(diff2 / ref2) if ref2 > 0 else 0.0,
        top1_agreement=agree / tokens if tokens else 1.0,
        loss_rel_change=float(loss_fn(got, labels)) / base_loss - 1 if base_loss else 0.0,
    )


def warn_if_inaccurate(report: AccuracyReport) -> None:
    """An :class:`AccuracyWarning` naming what exceeds the thresholds, with what to try."""
    problems = report.problems()
    if problems:
        warnings.warn(
            "the encrypted model departs from the float model on the inputset: " + "; ".join(problems)
            + ". More bits help: compile(..., precision=Precision(forward_bits=16, weight_bits=14)); "
            "see trainer/README.md, Quantization", AccuracyWarning, stacklevel=3)
