"""Waiting, bounded, for the swarm to fill a hole that leaves a session no route.

When no server holds some blocks, the swarm repairs itself: servers that could serve
them move there within seconds (`volunteer.daemon.hole_watch`). A session that finds no
route reads the swarm again at once (a replica may have joined since its last read);
if there is still none, it says which blocks it waits for and reads the swarm again
every `LOOK_S` until a route appears or its wait runs out.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

LOOK_S = 1.0
"""Time between reads of the swarm while waiting."""
REPAIR_WAIT_S = 60.0
"""A client's wait for one hole by default (a daemon's chat: its `repair_wait_s`): a
clean stop's hole is filled well within it, and a crashed server's too."""


class RepairWait:
    """The waits of one session (one episode per hole: `found` ends it).

    Args:
        wait_s: the longest one hole is waited for (0: a read again, no wait).
        reread: reads the swarm again for the session's route planning (None: the
            session's view cannot change, so nothing is worth waiting for).
        notify: told, once per hole, which blocks the session waits for.
    """

    def __init__(
        self,
        wait_s: float,
        reread: Callable[[], Awaitable[None]] | None,
        notify: Callable[[str], None] | None,
    ) -> None:
        self._wait_s = wait_s
        self._reread = reread
        self._notify = notify
        self._deadline: float | None = None
        """When the wait for the current hole runs out (None: no read again yet)."""
        self._told: tuple[int, int] | None = None

    async def again(self, gap: tuple[int, int]) -> bool:
        """Whether to plan the route again: after a read at once the first time, then
        after `LOOK_S` and a read, until the wait for this hole runs out."""
        if self._reread is None:
            return False
        now = asyncio.get_running_loop().time()
        if self._deadline is None:
            self._deadline = now + self._wait_s
            await self._reread()
            return True
        left_s = self._deadline - now
        if left_s <= 0:
            return False
        if self._notify is not None and self._told != gap:
            self._told = gap
            self._notify(
                f"waiting for blocks {gap[0]}:{gap[1]} to be served: no server holds them "
                f"now (up to {left_s:.0f} s more)"
            )
        await asyncio.sleep(min(LOOK_S, left_s))
        await self._reread()
        return True

    def found(self) -> None:
        """A route opened: the next hole gets a fresh wait."""
        self._deadline = None
        self._told = None
