"""`in_passing_thread`: torch work off the compute thread runs on a thread that is gone
once the work is done (so no OpenMP team outlives it)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from volunteer.machine.cpu_sharing import in_passing_thread


def test_the_work_runs_on_a_thread_that_has_ended_by_the_answer() -> None:
    seen: list[threading.Thread] = []

    def work(size: int, *, scale: float) -> torch.Tensor:
        seen.append(threading.current_thread())
        torch.set_num_threads(2)  # a parallel op: this thread gets an OpenMP team
        return torch.ones(size, size) @ torch.ones(size, size) * scale

    async def main() -> torch.Tensor:
        return await in_passing_thread(work, 64, scale=0.5)

    result = asyncio.run(main())
    assert torch.equal(result, torch.full((64, 64), 32.0))
    (thread,) = seen
    assert thread is not threading.main_thread()
    assert not thread.is_alive()


def test_an_error_reaches_the_caller() -> None:
    def broken() -> None:
        raise ValueError("corrupt weights")

    async def main() -> None:
        await in_passing_thread(broken)

    with pytest.raises(ValueError, match="corrupt weights"):
        asyncio.run(main())
