"""The compute thread: its torch thread count (OpenMP keeps one per thread, so the compute
thread sets it itself, per job: all threads for batches, `decode_threads` for one-position
steps), and the order it runs queued jobs in (inference first, then the peer that used
least compute lately)."""

from __future__ import annotations

import asyncio
import threading
import time

import torch

from tests.server import WAIT_S
from volunteer.server.anticipation import Anticipation
from volunteer.server.compute import (
    PRIORITY_INFERENCE,
    PRIORITY_TRAINING,
    PriorityCompute,
    ServiceTally,
)

PEER = "a peer"


def test_each_job_runs_on_its_thread_count() -> None:
    async def main() -> list[int]:
        compute = PriorityCompute(threads=2, decode_threads=1)
        try:
            seen = []
            for decode in (False, True, False, True):
                run = compute.run(
                    PRIORITY_INFERENCE, torch.get_num_threads, peer=PEER, decode=decode
                )
                count = await run
                seen.append(count)
            # A change (the volunteer's new setting) applies from the next job on.
            compute.threads = 1
            seen.append(await compute.run(PRIORITY_INFERENCE, torch.get_num_threads, peer=PEER))
            return seen
        finally:
            compute.shutdown()

    assert asyncio.run(main()) == [2, 1, 2, 1, 1]


def test_without_counts_the_thread_keeps_its_own() -> None:
    async def main() -> int:
        compute = PriorityCompute()
        try:
            return await compute.run(
                PRIORITY_INFERENCE, torch.get_num_threads, peer=PEER, decode=True
            )
        finally:
            compute.shutdown()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the compute thread starts with its creator's count
        assert asyncio.run(main()) == 1
    finally:
        torch.set_num_threads(before)


async def _wait_for_queue(compute: PriorityCompute, count: int) -> None:
    """Until `count` jobs wait behind the one running (a hang fails the test)."""
    async with asyncio.timeout(WAIT_S):
        while compute.queued < count:
            await asyncio.sleep(0.01)


def _hold(gate: threading.Event) -> None:
    """A job that keeps the compute thread until the test has queued the others."""
    if not gate.wait(WAIT_S):
        raise TimeoutError("the test never released the compute thread")


async def _wait_for_running(compute: PriorityCompute) -> None:
    """Until the compute thread took the first job off the queue."""
    async with asyncio.timeout(WAIT_S):
        while compute.queued:
            await asyncio.sleep(0.01)


def _run_order(held_by: str, jobs: list[tuple[int, str, str]]) -> list[str]:
    """The order the compute thread runs `jobs` (priority, name, peer) in, when all of
    them were queued, in that order, while a training job of `held_by` kept it busy."""

    async def main() -> list[str]:
        compute = PriorityCompute()
        order: list[str] = []
        gate = threading.Event()
        try:
            held = asyncio.ensure_future(compute.run(PRIORITY_TRAINING, _hold, gate, peer=held_by))
            await _wait_for_running(compute)
            queued = [
                asyncio.ensure_future(compute.run(priority, order.append, name, peer=peer))
                for priority, name, peer in jobs
            ]
            await _wait_for_queue(compute, len(jobs))
            gate.set()
            await asyncio.wait_for(asyncio.gather(held, *queued), WAIT_S)
            return order
        finally:
            gate.set()
            compute.shutdown()

    return asyncio.run(main())


def test_a_newcomer_runs_before_a_peer_with_a_backlog() -> None:
    """Least attained service first: a peer that has kept the thread busy (one identity
    of a flood) queues behind a peer that has used nothing, whatever it queued first."""
    flood = [(PRIORITY_TRAINING, f"flood {i}", "flood") for i in range(3)]
    newcomer = (PRIORITY_TRAINING, "newcomer", "newcomer")
    assert _run_order("flood", [*flood, newcomer]) == ["newcomer", "flood 0", "flood 1", "flood 2"]


def test_inference_runs_first_whoever_asked() -> None:
    """Fairness orders peers within a class: a busy peer's inference step still runs
    before a newcomer's training job."""
    training = (PRIORITY_TRAINING, "training", "new")
    step = (PRIORITY_INFERENCE, "step", "busy")
    assert _run_order("busy", [training, step]) == ["step", "training"]


def test_a_peers_use_is_charged_and_fades() -> None:
    now = [100.0]
    tally = ServiceTally(half_life_s=4.0, clock=lambda: now[0])
    tally.charge("a", 8.0)
    assert tally.of("a") == 8.0
    now[0] += 4.0
    assert tally.of("a") == 4.0
    tally.charge("a", 1.0)
    now[0] += 8.0
    assert tally.of("a") == 5.0 / 4
    assert tally.of("never seen") == 0.0


def test_the_tally_forgets_the_lightest_peers_past_its_bound() -> None:
    tally = ServiceTally(max_peers=4, clock=lambda: 0.0)
    for index in range(5):
        tally.charge(f"peer {index}", float(index + 1))
    # Over its bound, the tally keeps the heaviest half: the light ones read as newcomers.
    assert len(tally) <= 4
    assert tally.of("peer 4") == 5.0
    assert tally.of("peer 0") == 0.0


def test_each_job_is_charged_to_its_peer() -> None:
    async def main() -> tuple[float, float, int]:
        compute = PriorityCompute()
        try:
            await compute.run(PRIORITY_TRAINING, time.sleep, 0.01, peer="sleeper")
            await compute.run(PRIORITY_TRAINING, int, peer="quick")
            return compute.used_by("sleeper"), compute.used_by("nobody"), compute.jobs_run
        finally:
            compute.shutdown()

    sleeper, nobody, jobs = asyncio.run(main())
    # At least the time it slept, decayed a little: the decay halves in seconds.
    assert sleeper >= 0.01 * 0.5 and nobody == 0.0 and jobs == 2


def _chat_and_work(
    anticipation: Anticipation, gap_s: float, steps: int, work_after: int
) -> list[str]:
    """The order of a chat's steps (one every `gap_s` after the previous one ended) and one
    forward job queued right after step `work_after` ended."""

    async def main() -> list[str]:
        compute = PriorityCompute(anticipation=anticipation)
        order: list[str] = []
        try:
            work = None
            for step in range(steps):
                await compute.run(PRIORITY_INFERENCE, order.append, f"step {step}", peer=PEER)
                if step == work_after:
                    work = asyncio.ensure_future(
                        compute.run(PRIORITY_TRAINING, order.append, "work", peer="other")
                    )
                await asyncio.sleep(gap_s)
            assert work is not None
            await asyncio.wait_for(work, WAIT_S)
            return order
        finally:
            compute.shutdown()

    return asyncio.run(main())


def test_forward_work_waits_for_a_chats_next_step_when_it_is_due() -> None:
    # Wide margins: 0.3 s gaps, a 0.45 s window; a loaded machine's jitter fits in between.
    order = _chat_and_work(Anticipation(max_window_s=2.0), 0.3, steps=6, work_after=3)
    assert order.index("work") == order.index("step 4") + 1
    # Without anticipation, the same work runs at once, before that step.
    order = _chat_and_work(Anticipation(max_window_s=0.0), 0.3, steps=6, work_after=3)
    assert order.index("work") == order.index("step 3") + 1


def test_forward_work_still_runs_while_a_chat_never_pauses() -> None:
    anticipation = Anticipation(max_window_s=2.0, max_hold_s=0.3)
    order = _chat_and_work(anticipation, 0.1, steps=30, work_after=3)
    # Held 0.3 s at most (three steps or so), not until the chat's 30 steps are over.
    assert order.index("work") < order.index("step 15")


def _busy(seconds: float) -> float:
    """Work of `seconds` on the compute thread (the CPU kept busy, as a job would)."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass
    return seconds


def test_a_cpu_cap_rests_in_proportion_to_the_work() -> None:
    """max_cpu_percent's duty cycle: one thread under a cap of a quarter core is followed
    by three times its job's length of rest, during which the next job waits and no
    decode step runs inline."""

    async def main(cap: float | None) -> float:
        compute = PriorityCompute(threads=1, decode_threads=1, cpu_cap=cap)
        try:
            began = time.perf_counter()
            jobs = [
                compute.run(PRIORITY_INFERENCE, _busy, 0.05, peer=PEER, decode=True)
                for _ in range(4)
            ]
            await asyncio.gather(*jobs)
            # The rest follows the last job too: the next job waits for it.
            await compute.run(PRIORITY_INFERENCE, _busy, 0.0, peer=PEER, decode=True)
            return time.perf_counter() - began
        finally:
            compute.shutdown()

    assert asyncio.run(main(0.25)) >= 4 * 0.05 / 0.25 * 0.95  # work and three times its rest
    assert asyncio.run(main(1.0)) < 4 * 0.05 / 0.25 * 0.95  # one thread within a 1-core cap
    assert asyncio.run(main(None)) < 4 * 0.05 / 0.25 * 0.95


def test_a_throttled_decode_step_never_runs_on_the_event_loop() -> None:
    async def main() -> tuple[str, str]:
        compute = PriorityCompute(threads=1, decode_threads=1, cpu_cap=0.5)
        try:
            name = lambda: threading.current_thread().name  # noqa: E731
            await compute.run(PRIORITY_INFERENCE, name, peer=PEER, decode=True)  # timed
            second = await compute.run(PRIORITY_INFERENCE, name, peer=PEER, decode=True)
            compute.cpu_cap = None  # the volunteer lifts the limit: steps inline again
            await asyncio.sleep(0.05)
            third = await compute.run(PRIORITY_INFERENCE, name, peer=PEER, decode=True)
            return second, third
        finally:
            compute.shutdown()

    second, third = asyncio.run(main())
    assert second.startswith("volunteer-compute")
    assert third == threading.main_thread().name
