"""Fixtures of the trainer tests: one run per model family."""

from __future__ import annotations

from typing import Iterator

import pytest
import torch
from trainer_factory import ARCHS, Arch


def pytest_configure(config: pytest.Config) -> None:
    # peft 0.21 reads a property that transformers 5 deprecates; nothing to act on here.
    config.addinivalue_line("filterwarnings", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(params=ARCHS, ids=lambda a: a.name)
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.param


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """The models are tiny: one intra-op thread is faster, and immune to a busy second core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
