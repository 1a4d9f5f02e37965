"""fhe="remote" through the node client and a real provider process on loopback (slow: libp2p, a process)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest
import torch
from caps import time_limit
from trainer_factory import LLAMA, make_trainer, provider_process, token_data


@pytest.mark.slow
def test_remote_through_the_swarm_equals_simulate(tmp_path: Path) -> None:
    from cipherswarm.node import SwarmClient

    with time_limit(40), provider_process(tmp_path) as (model_dir, addr):  # 8-26 s measured on 2 busy cores
        data = token_data(4, 8)
        losses = {}
        for fhe in ("simulate", "remote"):
            trainer = make_trainer(LLAMA)
            trainer.compile(data[:1])
            torch.manual_seed(0)
            swarm = SwarmClient(model_dir=model_dir, bootstrap=[addr], ledger=tmp_path / "client.sqlite")
            with swarm if fhe == "remote" else contextlib.nullcontext() as client:
                trainer.train(torch.utils.data.DataLoader(data, batch_size=2), num_epochs=2, fhe=fhe, executor=client,
                              progress=False)
            losses[fhe] = trainer.get_training_losses()
            if fhe == "remote":  # one call per layer or group (q|k|v, gate|up) forward, and backward where enabled
                calls = sum(1 + spec.backward for spec in trainer.layer_specs().values())
                assert calls == 15 and all(r.remote_calls == calls and r.bytes_sent > 0 for r in trainer.step_records)
        assert losses["remote"] == losses["simulate"]
