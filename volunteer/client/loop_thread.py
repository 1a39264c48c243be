"""An asyncio event loop in a background thread, for synchronous callers of the swarm.

`volunteer chat --swarm` (and tests) run the P2P connections on such a loop and call into
it from the main thread; every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

Result = TypeVar("Result")


class LoopThread:
    """An event loop running in a daemon thread until `close()`."""

    def __init__(self, name: str = "volunteer-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name=name, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Result], timeout_s: float = 30.0) -> Result:
        """Runs a coroutine on the loop and waits for its result (cancelled on timeout)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except BaseException:
            future.cancel()
            raise

    def close(self) -> None:
        """Cancels what is left on the loop, then stops and closes it."""
        if self.loop.is_closed():
            return
        self.run(_cancel_leftovers())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.close()


async def _cancel_leftovers() -> None:
    # hivemind's P2P leaves listener tasks behind after shutdown; end them quietly.
    tasks = [task for task in asyncio.all_tasks() if task is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
