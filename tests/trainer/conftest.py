"""Fixtures of the trainer tests: one run per model family."""

from __future__ import annotations

import pytest
from trainer_factory import ARCHS, Arch


@pytest.fixture(params=ARCHS, ids=lambda a: a.name)
def arch(request: pytest.FixtureRequest) -> Arch:
    return request.param
