"""A driver that stops between settling a step and applying it (`Driver.finish_apply`):
started again on the same identity, it has the step's peers that had not applied apply
it now, those past it stay, and the job trains on as one process does."""

from __future__ import annotations

import asyncio

import pytest

from tests.training.swarm_helpers import alone, start_swarm, tiny_data, tiny_job, tiny_model
from tests.training.test_swarm_training import MEAN, THREE_AND_THREE, TOLERANCE
from volunteer.training.driver import Driver
from volunteer.training.step_types import Applying

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:path is deprecated")]


class DriverStopped(Exception):
    pass


def test_a_driver_that_stopped_mid_apply_finishes_the_step_when_back() -> None:
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=5)
    kept: list[tuple[float, list[Applying]]] = []

    async def stop_at_step_two(step: int, loss: float, applies: list[Applying]) -> None:
        if step == 2:
            kept.append((loss, applies))
            raise DriverStopped  # what `driving.json` would hold: then the process dies

    async def run() -> list[float]:
        swarm = await start_swarm(full, ends, job, data, stages=THREE_AND_THREE,
                                  rebalance=False, on_settled=stop_at_step_two)  # fmt: skip
        old = swarm.driver
        try:
            losses = [(await old.run_step()).loss for _ in range(2)]
            with pytest.raises(DriverStopped):
                await old.run_step()
            loss, pending = kept[0]
            # The last stage had applied before the driver died; the first had not.
            last = next(each for each in pending if each.stage == 1)
            await old._apply(last, old.stage_peers(1))
            again = Driver(p2p=old.p2p, job=job, data=data, members=dict(old.members),
                           checks=old.checks, rebalance=False)  # fmt: skip
            again.step, again.banned = old.step, dict(old.banned)
            await again.finish_apply(pending)
            assert again.step == 3 and not again.stale
            peers = [peer.trainer.steps for peer in swarm.peers]
            assert peers == [3] * len(swarm.peers)
            losses.append(loss)
            losses += [(await again.run_step()).loss for _ in range(job.steps - 3)]
            return losses
        finally:
            await swarm.close()

    losses = asyncio.run(run())
    assert losses == pytest.approx(alone(full, ends, job, data), rel=TOLERANCE)
