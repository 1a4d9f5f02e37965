"""Micro-batches of a step in flight together: the same results as one by one, and really together."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from trainer_factory import GPT2, LLAMA, make_trainer, token_data

from cipherswarm.trainer.executor import MatmulExecutor


def _params(trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


class _Slow:
    """An executor whose products take ``delay_s`` longer, as a link would; counts calls at once."""

    def __init__(self, inner: MatmulExecutor, delay_s: float, fail_on: int | None = None) -> None:
        self.inner, self.delay_s, self.fail_on = inner, delay_s, fail_on
        self.lock = threading.Lock()
        self.now = self.most = self.calls = 0

    def matmul(self, layer_key: str, x_int: torch.Tensor, *, transpose: bool) -> torch.Tensor:
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
            call = self.calls
        try:
            time.sleep(self.delay_s)
            if call == self.fail_on:
                raise ConnectionError("the link went down")
            return self.inner.matmul(layer_key, x_int, transpose=transpose)
        finally:
            with self.lock:
                self.now -= 1


def _train(arch, in_flight: int, fhe: str = "execute", steps: int = 2, accumulation: int = 3, delay_s: float = 0.0):
    trainer = make_trainer(arch, micro_batches_in_flight=in_flight,
                           training_args={"gradient_accumulation_steps": accumulation})
    data = token_data(steps * accumulation, 8)
    trainer.compile(data[:1])
    slow = _Slow(trainer._local[fhe], delay_s)
    loader = torch.utils.data.DataLoader(data, batch_size=1)
    trainer.train(loader, fhe="remote", executor=slow, progress=False)
    return trainer, slow


@pytest.mark.parametrize("arch", [LLAMA, GPT2], ids=["llama", "gpt2 (dropout on)"])
def test_overlapped_steps_equal_one_micro_batch_at_a_time(arch) -> None:
    """Encrypted products, 3 micro-batches per step: losses, gradient norms and LoRA weights bit for
    bit, whatever number are in flight. GPT-2 trains with dropout, so each micro-batch's random
    numbers must be its own whatever the interleaving."""
    one, _ = _train(arch, 1)
    results = [_train(arch, k) for k in (2, 3)]
    for trainer, slow in results:
        assert trainer.get_training_losses() == one.get_training_losses()
        assert [r.grad_norm for r in trainer.step_records] == [r.grad_norm for r in one.step_records]
        reference = _params(one)
        for name, p in _params(trainer).items():
            assert torch.equal(p, reference[name]), name
    assert len(one.get_training_losses()) == 2


def test_micro_batches_are_in_flight_together() -> None:
    """With each product 30 ms longer, two micro-batches wait for theirs at the same time."""
    one, slow_one = _train(LLAMA, 1, fhe="simulate", steps=1, accumulation=2, delay_s=0.03)
    two, slow_two = _train(LLAMA, 2, fhe="simulate", steps=1, accumulation=2, delay_s=0.03)
    assert slow_one.most == 1 and slow_two.most == 2
    assert slow_one.calls == slow_two.calls > 0
    assert two.step_records[0].wall_s < 0.8 * one.step_records[0].wall_s


def test_a_failed_micro_batch_fails_the_step_and_changes_nothing() -> None:
    trainer = make_trainer(LLAMA, training_args={"gradient_accumulation_steps": 2})
    data = token_data(2, 8)
    trainer.compile(data[:1])
    before = _params(trainer)
    slow = _Slow(trainer._local["simulate"], 0.0, fail_on=5)
    with pytest.raises(ConnectionError, match="link went down"):
        trainer.train(torch.utils.data.DataLoader(data, batch_size=1), fhe="remote", executor=slow, progress=False)
    assert trainer.global_step == 0
    assert all(torch.equal(p, before[n]) for n, p in _params(trainer).items())
    assert all(p.grad is None for p in trainer.model.parameters())
    assert not any(t.name.startswith("micro-batch") for t in threading.enumerate())  # none left behind


def test_in_flight_must_be_positive() -> None:
    with pytest.raises(ValueError, match="micro_batches_in_flight"):
        make_trainer(LLAMA, micro_batches_in_flight=0)
