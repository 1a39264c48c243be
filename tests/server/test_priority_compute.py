"""The compute thread's thread count: OpenMP keeps one per thread, so a change made on
the event loop's thread must be carried to the compute thread."""

from __future__ import annotations

import asyncio

import torch

from volunteer.server.sessions import PRIORITY_INFERENCE, PriorityCompute


def test_set_threads_reaches_the_compute_thread() -> None:
    async def main() -> list[int]:
        compute = PriorityCompute()
        try:
            seen = []
            for count in (1, 2, 1):
                await compute.set_threads(count)
                seen.append(await compute.run(PRIORITY_INFERENCE, torch.get_num_threads))
            # Set here only: the compute thread keeps what it was told.
            torch.set_num_threads(2)
            seen.append(await compute.run(PRIORITY_INFERENCE, torch.get_num_threads))
            return seen
        finally:
            compute.shutdown()

    before = torch.get_num_threads()
    try:
        assert asyncio.run(main()) == [1, 2, 1, 1]
    finally:
        torch.set_num_threads(before)
