"""The owner's upload cap (`max_upload_mbps`): what a server sends to peers, held to an
average rate.

A virtual clock: every byte sent moves `free_at` on by 1/rate of a second, from no earlier
than `BURST_S` ago; a writer waits until `free_at` has come. So over any stretch of time
T, at most rate * (T + BURST_S) bytes go out, and a reply after a quiet second goes at
once. Waits are plain sleeps of the event loop (one per reply), each bounded by the bytes
it pays for: a message of at most the server's message bound at the lowest rate.

Charged where the bytes are written to p2p streams (the servers' replies and pushes);
local links (this machine's processes) are not uploads and pay nothing.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

BURST_S = 1.0
"""What a quiet spell saves up: a second's worth of bytes goes out without a wait."""


class UploadLimit:
    """One daemon's upload cap, shared by its streams (used from the event loop only)."""

    def __init__(self, mbps: float | None = None, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.bytes_per_s: float | None = None
        self.free_at = float("-inf")
        self.sent_bytes = 0
        """Every byte charged, capped or not (for `status`)."""
        self.waited_s = 0.0
        """Time writers were held back by the cap, all of them together."""
        self.set_rate(mbps)

    def set_rate(self, mbps: float | None) -> None:
        """A new cap (None: none), at once: a change of the live setting."""
        self.bytes_per_s = None if mbps is None else mbps * 1e6 / 8

    def charge(self, count: int) -> float:
        """Counts `count` bytes as sent; returns how long to wait before sending them
        (0: at once) to keep within the cap."""
        self.sent_bytes += count
        if self.bytes_per_s is None:
            return 0.0
        now = self._clock()
        self.free_at = max(self.free_at, now - BURST_S) + count / self.bytes_per_s
        return max(0.0, self.free_at - now)

    async def spend(self, count: int) -> None:
        """Waits until `count` more bytes fit within the cap (and counts them)."""
        wait_s = self.charge(count)
        if wait_s > 0:
            self.waited_s += wait_s
            await asyncio.sleep(wait_s)
