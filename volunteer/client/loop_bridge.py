"""Running a coroutine on another thread's event loop and waiting for it, with a bound."""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Coroutine
from typing import Any, TypeVar

from volunteer.transport.protocol import PeerUnavailableError

Result = TypeVar("Result")


def run_on_loop(
    coro: Coroutine[Any, Any, Result],
    loop: asyncio.AbstractEventLoop,
    *,
    timeout_s: float,
    what: str,
) -> Result:
    """Runs `coro` on `loop` (owned by another thread) and returns its result.

    Raises:
        PeerUnavailableError: no result within `timeout_s` (the coroutine is cancelled).
        Whatever the coroutine raised.
    """
    future = asyncio.run_coroutine_threadsafe(coro, loop)
    try:
        # wait(), not result(timeout=): a TimeoutError the coroutine raises itself must not
        # pass for our own deadline (they are one class since Python 3.11).
        done, _ = concurrent.futures.wait([future], timeout=timeout_s)
    except BaseException:
        future.cancel()
        raise
    if not done:
        future.cancel()
        raise PeerUnavailableError(f"{what} took over {timeout_s:g} s; the swarm is stuck")
    return future.result()
