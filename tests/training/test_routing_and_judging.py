"""Routing and judging under trouble (`volunteer.training.driver`, `.settling`): a peer
measured slow once is tried again, and a judge that cannot recompute leaves the check
to the next one instead of letting the share through."""

from __future__ import annotations

import asyncio

import pytest

from tests.training.swarm_helpers import alone, start_swarm, tiny_data, tiny_job, tiny_model
from tests.training.test_swarm_training import MEAN, THREE_AND_THREE, TOLERANCE, _train
from volunteer.training.calls import TrainingCallError
from volunteer.training.loopback import LoopbackSwarm

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:path is deprecated")]


def test_a_peer_measured_slow_once_gets_work_again() -> None:
    """After the first step one stage-0 peer's measured speed drops twentyfold (a load
    spike): the next step leaves it idle, and an idle peer's speed drifts back toward
    the mean until it is picked and measured again."""
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=4)

    async def run() -> tuple[list, list[int]]:
        swarm = await start_swarm(full, ends, job, data, stages=THREE_AND_THREE, rebalance=False)
        try:
            victim = swarm.peer(0, 0).peer_id
            reports = [await swarm.driver.run_step()]
            swarm.driver.speeds[victim] /= 20
            worked = []
            for _ in range(job.steps - 1):
                reports.append(await swarm.driver.run_step())
                worked.append(swarm.driver.logged(victim))
            return reports, worked
        finally:
            await swarm.close()

    reports, worked = asyncio.run(run())
    assert worked[0] == 0, worked  # measured slow: the others took the step
    assert any(worked[1:]), worked  # then tried again
    assert [r.loss for r in reports] == pytest.approx(alone(full, ends, job, data), rel=TOLERANCE)


def test_a_judge_that_cannot_recompute_passes_the_check_to_the_next() -> None:
    """Stage 0 has five peers: peer 0 flips its gradient's sign, peers 1 and 2 refuse
    every recomputation. Each check of peer 0 goes on to the judges that answer, so
    none of its shares goes in unchecked and two of them ban it."""

    async def refuse(peer: str, header: dict, tensors: list) -> tuple[dict, list]:
        raise TrainingCallError("this judge will not recompute")

    async def lazy_judges(swarm: LoopbackSwarm) -> None:
        for lazy in swarm.peers[1:3]:
            lazy._op_verify = refuse  # type: ignore[method-assign]

    reports, swarm, _ = _train(
        [0, 0, 0, 0, 0, 1, 1], steps=3, rebalance=False, faults={0: "sign-flip"},
        before=lazy_judges,
    )  # fmt: skip
    attacker = swarm.peers[0].peer_id
    assert set(swarm.driver.banned) == {attacker}
    assert not any(attacker in report.unchecked for report in reports)


@pytest.mark.parametrize("attack", ["wrong-activations", "wrong-input-grads"])
def test_a_peer_that_passes_wrong_answers_on_is_banned_and_none_of_them_counts(
    attack: str,
) -> None:
    """Peers 0 and 3 send honest shares but pass noisy hidden states on (and report a
    halved loss, on the last stage), or send noisy gradients back: the validators
    recompute their answers too and ban them, the work that took their answers runs
    again, and every step's loss is still one process's."""
    reports, swarm, expected = _train(
        THREE_AND_THREE, steps=4, rebalance=False, faults={0: attack, 3: attack}
    )
    first, last = swarm.peers[0].peer_id, swarm.peers[3].peer_id
    # The first stage sends no input gradient back: it cannot commit the second.
    attackers = {last} if attack == "wrong-input-grads" else {first, last}
    assert set(swarm.driver.banned) == attackers
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)


def test_with_one_judge_a_liar_is_not_banned_but_its_answers_never_count() -> None:
    """Stage 0 has two peers, so a lie has one judge: one word against another bans
    nobody, but the liar's step starts over without it, every step."""
    reports, swarm, expected = _train(
        [0, 0, 1, 1, 1], steps=3, rebalance=False, faults={0: "wrong-activations"}
    )
    liar = swarm.peers[0].peer_id
    assert not swarm.driver.banned
    assert [r.loss for r in reports] == pytest.approx(expected, rel=TOLERANCE)
    assert liar in reports[0].dropped


def test_a_peer_its_daemon_bans_does_no_work_in_the_job() -> None:
    """The driver's daemon already bans a stage-1 peer (a proven liar elsewhere): it
    is banned from the job at its first step and never given a microbatch, and the
    job trains as one process would without it."""
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=3)
    outcast: list[str] = []

    async def run() -> tuple[list, int]:
        swarm = await start_swarm(
            full, ends, job, data, stages=THREE_AND_THREE, rebalance=False,
            faults={4: "sign-flip"}, banned_outside=lambda peer: peer in outcast,
        )  # fmt: skip
        try:
            outcast.append(swarm.peers[4].peer_id)
            reports = [await swarm.driver.run_step() for _ in range(job.steps)]
            return reports, swarm.peers[4].trainer.samples
        finally:
            await swarm.close()

    reports, samples = asyncio.run(run())
    assert reports[0].banned == outcast and not any(r.banned for r in reports[1:])
    assert samples == 0 and not any(r.dropped for r in reports)
    assert [r.loss for r in reports] == pytest.approx(alone(full, ends, job, data), rel=TOLERANCE)


def test_a_peer_whose_weights_drifted_is_brought_back_to_the_stages() -> None:
    """A stage-1 peer's weights drift by a rounding's worth after the first step (as on
    a machine that rounds otherwise): its share, whose claim names other weights, is
    refused by the stage; it is synced back at the step's apply, and the stage's
    peers hold the same bytes again."""
    import torch

    from volunteer.training.claims import weights_digest

    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=48, sequence=8)
    job = tiny_job(data, aggregation=MEAN, steps=3)

    async def run() -> tuple[list, str, set[bytes]]:
        swarm = await start_swarm(full, ends, job, data, stages=THREE_AND_THREE, rebalance=False)
        try:
            reports = [await swarm.driver.run_step()]
            drifted = swarm.peer(1, 0)
            with torch.no_grad():
                drifted.trainer.params[0].view(-1)[0] += 1e-6
            drifted._weights_at = None  # the drift happened inside the optimizer's step
            reports += [await swarm.driver.run_step() for _ in range(job.steps - 1)]
            stage = [peer for peer in swarm.peers if peer.stage == 1]
            return reports, drifted.peer_id, {weights_digest(p.trainer.params) for p in stage}
        finally:
            await swarm.close()

    reports, drifted, held = asyncio.run(run())
    assert drifted in reports[1].dropped and not reports[2].dropped
    assert len(held) == 1
    assert [r.loss for r in reports] == pytest.approx(alone(full, ends, job, data), rel=TOLERANCE)
