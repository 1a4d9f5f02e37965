"""Fixtures of the node tests: a tiny model, its weights, and readable failures.

Helpers that start nodes live in node_factory.py (a unique module name: every test folder has a
conftest, and `import conftest` would find whichever came first).
"""

from __future__ import annotations

import traceback
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from cipherswarm.node import ModelWeights, load_model
from cipherswarm.node.errors import leaf_errors


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Report the leaves of a failure's exception group: a failing node test raises through many
    nested nurseries (each host, each service), deeper than Python prints groups."""
    outcome = yield
    error = call.excinfo.value if call.excinfo is not None else None
    if isinstance(error, BaseExceptionGroup):
        leaves = "\n".join("".join(traceback.format_exception(leaf)) for leaf in leaf_errors(error))
        outcome.get_result().sections.append(("innermost errors", leaves))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random-init LlamaForCausalLM (hidden 64, intermediate 128, 2 layers, vocab 128)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=128,
        max_position_embeddings=64,
    )
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


@pytest.fixture(scope="session")
def weights(model_dir: Path) -> ModelWeights:
    return load_model(model_dir)
