"""Waiting on an asyncio queue with a timeout, cheaply.

`asyncio.wait_for` wraps its awaitable in a new task on Python 3.10 and 3.11: on the
path of every inference step (several queue waits per hop and token) that extra task
and its scheduling cost more than the work around it. `asyncio.timeout` (3.11+) only
arms a timer on the waiting task.
"""

from __future__ import annotations

import asyncio
import sys
from typing import TypeVar

Item = TypeVar("Item")


async def get_within(queue: asyncio.Queue[Item], timeout_s: float) -> Item:
    """The queue's next item.

    Raises:
        asyncio.TimeoutError: nothing came within timeout_s (nothing is taken then).
    """
    if not queue.empty():
        return queue.get_nowait()
    if sys.version_info >= (3, 11):
        async with asyncio.timeout(timeout_s):
            return await queue.get()
    return await asyncio.wait_for(queue.get(), timeout_s)
