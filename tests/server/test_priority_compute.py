"""The compute thread's torch thread count: OpenMP keeps one per thread, so the compute
thread sets it itself, per job: all threads for batches, `decode_threads` for one-position
steps."""

from __future__ import annotations

import asyncio

import torch

from volunteer.server.compute import PRIORITY_INFERENCE, PriorityCompute


def test_each_job_runs_on_its_thread_count() -> None:
    async def main() -> list[int]:
        compute = PriorityCompute(threads=2, decode_threads=1)
        try:
            seen = []
            for decode in (False, True, False, True):
                count = await compute.run(PRIORITY_INFERENCE, torch.get_num_threads, decode=decode)
                seen.append(count)
            # A change (the volunteer's new setting) applies from the next job on.
            compute.threads = 1
            seen.append(await compute.run(PRIORITY_INFERENCE, torch.get_num_threads))
            return seen
        finally:
            compute.shutdown()

    assert asyncio.run(main()) == [2, 1, 2, 1, 1]


def test_without_counts_the_thread_keeps_its_own() -> None:
    async def main() -> int:
        compute = PriorityCompute()
        try:
            return await compute.run(PRIORITY_INFERENCE, torch.get_num_threads, decode=True)
        finally:
            compute.shutdown()

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # the compute thread starts with its creator's count
        assert asyncio.run(main()) == 1
    finally:
        torch.set_num_threads(before)
