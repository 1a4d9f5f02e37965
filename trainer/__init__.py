"""LoRA fine-tuning of Hugging Face models whose frozen base matmuls run encrypted elsewhere.

Quick start::

    from cipherswarm.trainer import LoraTrainer, causal_lm_loss
    trainer = LoraTrainer(model=peft_model, optimizer=opt, loss_fn=causal_lm_loss,
                          n_layers_to_skip_for_backprop=3)
    trainer.compile(inputset)        # bit widths: Precision's defaults; trainer.accuracy holds the check
    trainer.train(loader, num_epochs=1, fhe="execute")
    trainer.save_and_clear_private_info("adapters/")

Your own training loop (HF Trainer, TRL, plain torch)::

    from cipherswarm.trainer import remote_base_layers
    remote = remote_base_layers(peft_model, inputset, fhe="execute")   # base layers encrypted from now on
    ...  # any loop: peft_model(**batch).loss.backward(); optimizer.step()
    remote.clear_private_info()

See README.md for the modes and the executor seam that ``fhe="remote"`` plugs into.
"""

from cipherswarm.fhe_backend.quant import Precision

from .accuracy import AccuracyReport, AccuracyWarning
from .batches import causal_lm_loss, mean_pooled_contrastive_loss, model_output, split_batch
from .errors import BackpropSkipError, NoLoraLayersError, NotCompiledError, TrainerError, TrainingStopped
from .executor import ExecutorStatistics, LayerSpec, LocalExecutor, LoopbackProvider, MatmulExecutor
from .layers import RemoteLinear
from .quantization import dequantize_product, quantize_per_token
from .records import StepRecord
from .remote import FHE_MODES, ModeSwitch, RemoteBaseLayers, remote_base_layers
from .trainer import LoraTrainer

__all__ = [
    "LoraTrainer", "Precision", "AccuracyReport", "AccuracyWarning", "causal_lm_loss", "mean_pooled_contrastive_loss",
    "model_output", "split_batch", "StepRecord", "FHE_MODES",
    "remote_base_layers", "RemoteBaseLayers", "ModeSwitch",
    "MatmulExecutor", "LayerSpec", "LocalExecutor", "LoopbackProvider", "ExecutorStatistics",
    "RemoteLinear", "quantize_per_token", "dequantize_product",
    "TrainerError", "NotCompiledError", "NoLoraLayersError", "BackpropSkipError", "TrainingStopped",
]
