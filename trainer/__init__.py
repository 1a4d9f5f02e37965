"""LoRA fine-tuning of Hugging Face models whose frozen base matmuls run encrypted elsewhere.

Quick start::

    from cipherswarm.trainer import LoraTrainer, causal_lm_loss
    trainer = LoraTrainer(model=peft_model, optimizer=opt, loss_fn=causal_lm_loss,
                          n_layers_to_skip_for_backprop=3)
    trainer.compile(inputset)        # bit widths: Precision's defaults; trainer.accuracy holds the check
    trainer.train(loader, num_epochs=1, fhe="execute")
    trainer.save_and_clear_private_info("adapters/")

See README.md for the modes and the executor seam that ``fhe="remote"`` plugs into.
"""

from cipherswarm.fhe_backend.quant import Precision

from .accuracy import AccuracyReport, AccuracyWarning
from .errors import BackpropSkipError, NoLoraLayersError, NotCompiledError, TrainerError
from .executor import ExecutorStatistics, LayerSpec, LocalExecutor, LoopbackProvider, MatmulExecutor
from .layers import RemoteLinear
from .quantization import dequantize_product, quantize_per_token
from .trainer import FHE_MODES, LoraTrainer, StepRecord, causal_lm_loss, split_batch

__all__ = [
    "LoraTrainer", "Precision", "AccuracyReport", "AccuracyWarning", "causal_lm_loss", "split_batch", "StepRecord", "FHE_MODES",
    "MatmulExecutor", "LayerSpec", "LocalExecutor", "LoopbackProvider", "ExecutorStatistics",
    "RemoteLinear", "quantize_per_token", "dequantize_product",
    "TrainerError", "NotCompiledError", "NoLoraLayersError", "BackpropSkipError",
]
