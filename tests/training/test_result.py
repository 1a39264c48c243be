"""A finished job's result (`volunteer.training.result`): the driver takes each
stage's trained tensors from its peers, keeps what most of them hold (a peer that hands
over other weights is outvoted, peers that disagree without a majority give no
result), and a LoRA job's stages make one adapter equal to one process's."""

from __future__ import annotations

import asyncio

import pytest
import torch
from volunteer.models.adapters import LORA_TARGETS

from tests.training.swarm_helpers import alone_trained, start_swarm, tiny_data, tiny_job, tiny_model
from tests.training.test_swarm_training import MEAN, THREE_AND_THREE
from volunteer.training import attacks
from volunteer.training.calls import call
from volunteer.training.result import ResultError, block_weights, lora_adapter

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:path is deprecated")]


def test_a_lora_jobs_adapter_is_one_processs_and_a_lying_peer_is_outvoted() -> None:
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=3, lora_rank=4)

    async def run() -> dict[str, torch.Tensor]:
        swarm = await start_swarm(full, ends, job, data, stages=THREE_AND_THREE, rebalance=False)
        try:
            for _ in range(job.steps):
                await swarm.driver.run_step()
            liar = swarm.peer(1, 0)
            honest_state = liar._op_state

            def other_weights(seed: int):
                async def answer(peer: str, header: dict, tensors: list):
                    answer, state = await honest_state(peer, header, tensors)
                    return answer, [attacks.noisy(t, seed=seed) for t in state]

                return answer

            liar._op_state = other_weights(1)  # type: ignore[method-assign]
            adapter = lora_adapter(job, await swarm.driver.result())
            # A second liar in stage 1, with weights of its own: three answers, no two alike.
            swarm.peer(1, 1)._op_state = other_weights(2)  # type: ignore[method-assign]
            with pytest.raises(ResultError, match="hold different weights"):
                await swarm.driver.result()
            return adapter
        finally:
            await swarm.close()

    adapter = asyncio.run(run())
    _, trained = alone_trained(full, ends, job, data)
    assert sorted(adapter) == sorted(f"lora.{t}.{p}" for t in LORA_TARGETS for p in "ab")
    for name, got in adapter.items():
        assert _distance(got, trained[name]) < 1e-4, name


def test_a_job_of_the_blocks_gives_each_blocks_trained_tensors() -> None:
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=3)

    async def run() -> dict[int, dict[str, torch.Tensor]]:
        swarm = await start_swarm(full, ends, job, data, stages=[0, 0, 1, 1], rebalance=False)
        try:
            for _ in range(job.steps):
                await swarm.driver.run_step()
            # The result takes the weights alone, not the optimizer's moments too.
            peer = swarm.peer(1, 0)
            sizes = []
            for header in ({"op": "state", "weights_only": True}, {"op": "state"}):
                _, state = await call(
                    swarm.driver.p2p, peer.peer_id, header, timeout_s=30,
                    max_answer_bytes=1 << 26,
                )  # fmt: skip
                sizes.append(len(state))
            assert sizes[0] == len(peer.trainer.params) < sizes[1]
            return block_weights(job, await swarm.driver.result())
        finally:
            await swarm.close()

    blocks = asyncio.run(run())
    _, trained = alone_trained(full, ends, job, data)
    got = {f"blocks.{i}.{name}": t for i, block in blocks.items() for name, t in block.items()}
    assert sorted(got) == sorted(trained)
    for name, tensor in got.items():
        assert _distance(tensor, trained[name]) < 1e-4, name


def _distance(got: torch.Tensor, expected: torch.Tensor) -> float:
    assert got.shape == expected.shape
    return float((got - expected).norm() / expected.norm())
