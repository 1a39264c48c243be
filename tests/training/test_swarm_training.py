"""A training swarm on loopback (`volunteer.training.peer`, `.driver`): stage peers on
their own P2P daemons train a tiny random Llama as one process does; Byzantine peers
are caught and banned; a peer killed mid-step loses no data; five peers in one stage of
two spread out."""

from __future__ import annotations

import asyncio
import functools

import pytest

from tests.training.swarm_helpers import alone, start_swarm, tiny_data, tiny_job, tiny_model
from volunteer.training.job import Aggregation
from volunteer.training.loopback import LoopbackSwarm
from volunteer.training.settling import PROBATION_CHECKS
from volunteer.training.step_types import StepReport

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:path is deprecated")]

TOLERANCE = 1e-5
"""Relative, on each step's loss: float32 shares summed in another order than one
process sums its batch."""
MEAN = Aggregation(kind="mean")
CLIP = Aggregation(kind="centered-clip", tau=0.05)
THREE_AND_THREE = [0, 0, 0, 1, 1, 1]


def _train(
    stages: list[int],
    aggregation: Aggregation = MEAN,
    steps: int = 6,
    during=None,
    lora_rank: int | None = None,
    before=None,
    **options,
):
    """Trains `steps` steps; `before(swarm)` runs before the first, `during(swarm)`
    alongside it."""
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=aggregation, steps=steps, lora_rank=lora_rank)

    async def run() -> tuple[list[StepReport], LoopbackSwarm]:
        swarm = await start_swarm(full, ends, job, data, stages=stages, **options)
        try:
            if before is not None:
                await before(swarm)
            first = asyncio.create_task(swarm.driver.run_step())
            if during is not None:
                await during(swarm)
            reports = [await first]
            reports += [await swarm.driver.run_step() for _ in range(job.steps - 1)]
            return reports, swarm
        finally:
            await swarm.close()

    reports, swarm = asyncio.run(run())
    return reports, swarm, alone(full, ends, job, data)


def test_two_stages_of_three_peers_train_as_one_process() -> None:
    reports, swarm, expected = _train(THREE_AND_THREE, rebalance=False)
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)
    assert not swarm.driver.banned  # the validators recomputed honest shares alike


def test_lora_adapters_of_the_stages_train_as_one_process_trains_them() -> None:
    """A large model's job trains LoRA adapters: the blocks stay frozen on every peer."""
    reports, swarm, expected = _train(THREE_AND_THREE, rebalance=False, lora_rank=4)
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)
    assert expected[-1] < expected[0] - 0.05  # the adapters did learn
    peer = swarm.peer(0, 0)
    assert not any(p.requires_grad for p in peer.trainer.span.parameters())
    assert peer.size == sum(t.numel() for t in peer.trainer.params) < 20_000


def test_centered_clip_trains_within_five_percent_of_one_process() -> None:
    reports, _, expected = _train(THREE_AND_THREE, CLIP, rebalance=False)
    assert [r.loss for r in reports] == pytest.approx(expected, rel=0.05)


ATTACKS = ("sign-flip", "random-direction", "label-flip", "stale:2", "ipm", "alie")


@functools.cache
def _clean_clipped_run() -> list[StepReport]:
    return _train(THREE_AND_THREE, CLIP, steps=8, rebalance=False)[0]


@pytest.mark.parametrize("attack", ATTACKS)
def test_one_byzantine_peer_per_stage_is_banned_and_training_converges(attack: str) -> None:
    """Peer 0 (stage 0) and peer 3 (stage 1) attack from the first step: on probation,
    every share they send is recomputed, so none goes in unchecked and they are banned
    in their first steps."""
    clean = _clean_clipped_run()
    reports, swarm, _ = _train(
        THREE_AND_THREE, CLIP, steps=8, rebalance=False, faults={0: attack, 3: attack}
    )
    first, last = swarm.peers[0].peer_id, swarm.peers[3].peer_id
    banned = swarm.driver.banned
    # Label flipping needs the targets: only the last stage's attacker can commit it.
    attackers = {last} if attack == "label-flip" else {first, last}
    assert set(banned) == attackers
    # On probation, no share of theirs went in unchecked (a step may have sent none:
    # their work ran again elsewhere when they failed, or took a liar's gradients).
    assert not any(attackers & set(report.unchecked) for report in reports)
    assert max(banned.values()) < PROBATION_CHECKS + 2, banned
    # The last four steps see the four batches of the data once: the converged loss.
    tail = sum(r.loss for r in reports[-4:]) / 4
    assert tail == pytest.approx(sum(r.loss for r in clean[-4:]) / 4, rel=0.05)


def test_a_peer_killed_mid_step_loses_no_data() -> None:
    """A stage-1 peer dies once the driver logged a microbatch of the first step as its
    work: that work runs again on the others, and every step's loss is still one
    process's."""

    async def kill_when_busy(swarm: LoopbackSwarm) -> None:
        victim = swarm.peer(1, 0)
        while not swarm.driver.logged(victim.peer_id):
            await asyncio.sleep(0.005)
        await swarm.kill(victim)

    reports, swarm, expected = _train(THREE_AND_THREE, rebalance=False, during=kill_when_busy)
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)
    assert swarm.peer(1, 0).peer_id in reports[0].dropped


def test_five_peers_in_one_stage_of_two_spread_out() -> None:
    reports, swarm, expected = _train([0, 0, 0, 0, 0], steps=6)
    sizes = [len(swarm.driver.stage_peers(stage)) for stage in (0, 1)]
    assert min(sizes) >= 2, sizes
    # The movers took the stage's state: the swarm still trains as one process.
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)


def test_a_peer_that_joins_late_takes_the_stage_state_and_trains_on() -> None:
    """The sixth peer is unknown to the driver for three steps, then announced: it is
    brought to the current step from a peer of its stage and works from then on."""
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=6)

    async def run() -> tuple[list[StepReport], int, int]:
        swarm = await start_swarm(full, ends, job, data, stages=THREE_AND_THREE, rebalance=False)
        try:
            late = swarm.peers[-1]
            swarm.driver.remove_member(late.peer_id)
            reports = [await swarm.driver.run_step() for _ in range(3)]
            swarm.driver.add_member(late.peer_id, late.stage)
            reports += [await swarm.driver.run_step() for _ in range(3)]
            worked = sum(1 for peer in swarm.driver.stage_peers(1) if swarm.driver.logged(peer))
            return reports, late.trainer.steps, worked
        finally:
            await swarm.close()

    reports, late_steps, worked = asyncio.run(run())
    assert late_steps == job.steps
    assert worked == 3  # the last step's stage 1 used all three peers
    assert [r.loss for r in reports] == pytest.approx(alone(full, ends, job, data), rel=TOLERANCE)


def test_answers_of_the_wrong_form_fail_their_peer_and_lose_nothing() -> None:
    """A stage-0 peer answers forwards with hidden states of the wrong shape, a stage-1
    peer answers losses that are not numbers: the driver takes neither, runs their
    microbatches on the others, and trains as one process does."""
    import torch

    async def junk_forward(peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        return {}, [torch.zeros(1, 1, 1)]

    async def junk_loss(peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        return {"loss": float("nan")}, [torch.zeros_like(tensors[0])]

    async def break_two(swarm: LoopbackSwarm) -> None:
        swarm.peers[0]._op_forward = junk_forward  # type: ignore[method-assign]
        swarm.peers[3]._op_loss = junk_loss  # type: ignore[method-assign]

    reports, swarm, expected = _train(THREE_AND_THREE, rebalance=False, during=None,
                                      before=break_two)  # fmt: skip
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)
    assert {swarm.peers[0].peer_id, swarm.peers[3].peer_id} <= swarm.driver.failed


def test_a_step_that_stalls_starts_over_and_counts_nothing_twice() -> None:
    """Both stage-1 peers die in the first step: it stalls, stage 0 forgets what it
    summed; a third stage-1 peer arrives and the step runs again from the start."""
    from volunteer.training.step_types import TrainingStalled

    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=3)

    async def run() -> list[StepReport]:
        swarm = await start_swarm(full, ends, job, data, stages=[0, 0, 1, 1, 1], rebalance=False)
        try:
            spare = swarm.peers[-1]
            swarm.driver.remove_member(spare.peer_id)
            step = asyncio.create_task(swarm.driver.run_step())
            while not swarm.driver.logged(swarm.peers[2].peer_id):
                await asyncio.sleep(0.005)
            for peer in swarm.peers[2:4]:
                await swarm.kill(peer)
            with pytest.raises(TrainingStalled):
                await step
            assert not any(peer.trainer.samples for peer in swarm.peers[:2])
            swarm.driver.add_member(spare.peer_id, 1)
            return [await swarm.driver.run_step() for _ in range(job.steps)]
        finally:
            await swarm.close()

    reports = asyncio.run(run())
    assert [r.loss for r in reports] == pytest.approx(alone(full, ends, job, data), rel=TOLERANCE)
