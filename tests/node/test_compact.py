"""The compact profile against cheating providers on the wire: what its tolerance check catches,
and what it lets through by design (an error of the order of its own noise)."""

from __future__ import annotations

import pytest
import torch
import trio

from cipherswarm.node import Cheat, Ledger, ModelWeights

from node_factory import providers, random_operand, reference, session

LAYER = "model.layers.0.mlp.up_proj"


async def _one_call(weights: ModelWeights, cheat: Cheat, ledger: Ledger) -> tuple[torch.Tensor, float, bool]:
    """One two-block call split over an honest provider and a cheater: (the call's error against
    the exact product, the decoded-error bound, whether the cheater was caught and banned)."""
    async with providers(weights, [dict(slots=1), dict(slots=1, cheat=cheat)]) as (honest, cheater):
        async with session(weights, [honest.addr, cheater.addr], ledger=ledger, min_providers=2, split="blocks",
                           profile="compact") as client:
            params = client.keys.channel(client.weights.resolve(LAYER), transpose=False).params
            x = random_operand(2 * params.n, 64)
            y = await client.matmul(LAYER, x)
            err = (y - reference(weights, LAYER, x, transpose=False)).abs()
            caught = cheater.node.peer_id.to_base58() in client.stats().bans
            assert cheater.provider.statistics().served >= 1  # it did answer a chunk of the call
            return err, params.decoded_error, caught


@pytest.mark.parametrize("cheat", [Cheat.RANDOM, Cheat.WRONG_WEIGHTS], ids=lambda c: c.value)
async def test_wrong_results_are_caught_and_redone_within_the_bound(weights: ModelWeights, cheat: Cheat) -> None:
    with trio.fail_after(120), Ledger() as ledger:
        err, bound, caught = await _one_call(weights, cheat, ledger)
        assert caught and err.max() <= bound


async def test_an_error_below_the_noise_passes_by_design(weights: ModelWeights) -> None:
    """`flip` moves one decoded value by 1, far inside the noise the profile allows: it is accepted,
    and the call's values stay within the bound plus that 1 (what the profile trades for its bytes)."""
    with trio.fail_after(120), Ledger() as ledger:
        err, bound, caught = await _one_call(weights, Cheat.FLIP, ledger)
        assert not caught and bound > 1 and err.max() <= bound + 1
