"""When forward/backward work should leave the compute thread idle for a moment, because
the next inference step of a chat is about to come.

A chat's steps reach a server one after another, each after the rest of its route has
run: the server is idle in between, and forward/backward slices fill that gap. A slice
that starts just before the next step arrives makes that step wait for it, once per
server on the route and per token. Like an anticipatory disk scheduler, which leaves the
disk idle a few milliseconds for the next read of a process that is reading in order,
`Anticipation` keeps the gap between an inference step's end and the next one's arrival
(a moving average) and holds forward/backward work back for that long, and a little more,
after each step. A route's own pace sets the window, within `max_window_s`, so a swarm
across the internet, whose gaps are longer, is waited for only as long as that bound.

Holding is bounded: forward/backward work is held `max_hold_s` in a row at most, then
one job runs, so a server that chats without pause still serves calls (slowly); and a
pause in the chat (a person typing) ends the hold at the window's end.
"""

from __future__ import annotations

import time
from collections.abc import Callable

MAX_WINDOW_S = 0.25
"""The longest forward/backward work waits after an inference step for the next one."""
MAX_HOLD_S = 0.5
"""The longest forward/backward work is held back in a row before one job of it runs."""
WINDOW_MARGIN = 1.5
"""The window is the average gap times this: a step a little late is still waited for."""
GAP_WEIGHT = 0.3
"""The weight of the newest gap in the moving average."""


class Anticipation:
    """The inference steps' pace, and whether forward/backward work should wait now.

    Not thread-safe: `PriorityCompute` holds its lock around every call.
    """

    def __init__(
        self,
        *,
        max_window_s: float = MAX_WINDOW_S,
        max_hold_s: float = MAX_HOLD_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_window_s = max_window_s
        self.max_hold_s = max_hold_s
        self.clock = clock
        self.gap_s: float | None = None
        """The moving average of the gaps between a step's end and the next one's
        arrival (None: no gap seen yet)."""
        self._last_end: float | None = None
        self._held_since: float | None = None

    def inference_arrived(self) -> None:
        if self._last_end is None:
            return
        # A long pause counts as twice the window at most: one pause makes the average
        # large (so no hold is worth it) without taking many steps to come back down.
        gap = min(self.clock() - self._last_end, 2 * self.max_window_s)
        self.gap_s = gap if self.gap_s is None else self.gap_s + GAP_WEIGHT * (gap - self.gap_s)

    def inference_ended(self) -> None:
        self._last_end = self.clock()

    def training_wait_s(self) -> float:
        """How much longer forward/backward work should wait now (0: start it)."""
        if self._last_end is None or self.gap_s is None or self.max_window_s <= 0:
            return 0.0
        now = self.clock()
        window = min(self.gap_s * WINDOW_MARGIN, self.max_window_s)
        wait = self._last_end + window - now
        if wait <= 0:
            self._held_since = None
            return 0.0
        if self._held_since is None:
            self._held_since = now
        left = self._held_since + self.max_hold_s - now
        if left <= 0:
            return 0.0
        return min(wait, left)

    def training_started(self) -> None:
        self._held_since = None
