"""A rate budget per remote peer: how much work one stranger may ask of us per second.

Each peer has a token bucket (`burst` tokens, refilled at `rate` per second); a request
spends as many tokens as it carries items, and is refused whole when the bucket lacks
them. The table of buckets is bounded: past `max_peers`, the peer heard from longest ago
is forgotten, so a crowd of fresh identities costs memory only up to that bound (each
forgotten identity starts again with a full bucket, which is what a new peer gets anyway).
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Callable, Hashable

DEFAULT_MAX_PEERS = 4096


@dataclasses.dataclass
class _Bucket:
    tokens: float
    updated: float


class PeerBudget:
    """Token buckets per peer (see the module's docstring)."""

    def __init__(
        self,
        *,
        rate: float,
        burst: float,
        max_peers: int = DEFAULT_MAX_PEERS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst <= 0 or max_peers <= 0:
            raise ValueError("rate, burst and max_peers must be positive")
        self.rate = rate
        self.burst = burst
        self.max_peers = max_peers
        self.refused = 0
        """Requests refused so far (for the log and tests)."""
        self._clock = clock
        self._buckets: collections.OrderedDict[Hashable, _Bucket] = collections.OrderedDict()

    def take(self, peer: Hashable, cost: float = 1.0) -> bool:
        """Spends `cost` tokens of `peer`'s bucket; False (nothing spent) when it lacks them."""
        now = self._clock()
        bucket = self._buckets.pop(peer, None)
        if bucket is None:
            bucket = _Bucket(tokens=self.burst, updated=now)
            while len(self._buckets) >= self.max_peers:
                self._buckets.popitem(last=False)
        bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        self._buckets[peer] = bucket  # the most recently heard-from peer goes last
        if bucket.tokens < cost:
            self.refused += 1
            return False
        bucket.tokens -= cost
        return True

    def __len__(self) -> int:
        return len(self._buckets)
