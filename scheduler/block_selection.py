"""Where a server should sit: the window of consecutive blocks where the swarm is weakest.

A token must pass every block, so the swarm is as fast as its slowest block. A server
that joins therefore takes the window of blocks whose throughputs, sorted ascending, are
smallest in lexicographic order: first the window holding the weakest block, and among
those the one whose next-weakest block is weakest, and so on (the rule of Petals'
`choose_best_blocks`). Sorting before comparing makes equal windows compare equal, so
float noise in sums cannot send two servers to different places.
"""

from __future__ import annotations

import dataclasses
import math
import random
import statistics
from collections.abc import Iterable, Sequence

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

CLAIM_CAP_FACTOR = 4.0
"""A server's claimed throughput counts for placement as at most this many typical
servers (the swarm's low median claim). Claims are unchecked: without a cap one record
of 1e9 tokens/s makes its blocks look served forever and steers every newcomer away.
The median holds while liars are fewer than half the claims; a fast honest server in a
slow swarm is undercounted, which only moves newcomers a little towards its blocks."""


def claim_cap(claims: Sequence[float]) -> float:
    """The most one claim counts for placement (`CLAIM_CAP_FACTOR`); inf with no claims."""
    if not claims:
        return math.inf
    return CLAIM_CAP_FACTOR * statistics.median_low(claims)


@dataclasses.dataclass(frozen=True)
class ServerSpan:
    """One server of the swarm: blocks [start, end) at `throughput` tokens/s each."""

    peer_id: str
    start: int
    end: int
    throughput: float

    def __post_init__(self) -> None:
        if not 0 <= self.start < self.end:
            raise ValueError(f"{self.peer_id}: bad span [{self.start}, {self.end})")
        if not self.throughput >= 0:  # also refuses NaN
            raise ValueError(f"{self.peer_id}: throughput must be >= 0, got {self.throughput}")

    @property
    def length(self) -> int:
        return self.end - self.start


def block_throughputs(spans: Iterable[ServerSpan], total_blocks: int) -> np.ndarray:
    """Per block, the summed throughput of the servers holding it.

    Spans are added in peer-id order, so the same swarm always gives the same floats.

    Raises:
        ValueError: a span reaches past `total_blocks`.
    """
    throughputs = np.zeros(total_blocks, dtype=np.float64)
    for span in sorted(spans, key=lambda s: (s.peer_id, s.start)):
        if span.end > total_blocks:
            raise ValueError(f"{span.peer_id}: span ends at {span.end} > {total_blocks} blocks")
        throughputs[span.start : span.end] += span.throughput
    return throughputs


def choose_best_start(
    throughputs: Sequence[float] | np.ndarray, length: int, rng: random.Random | None = None
) -> int:
    """The start of the `length`-block window where the swarm is weakest (see above).

    Args:
        throughputs: per-block throughput of the swarm without the choosing server.
        length: how many blocks the server will hold.
        rng: breaks ties between equally weak windows (so servers joining at the same
            moment spread out); without it the lowest start wins.
    """
    values = np.asarray(throughputs, dtype=np.float64)
    if not 1 <= length <= len(values):
        raise ValueError(f"length must be in [1, {len(values)}], got {length}")
    keys = np.sort(sliding_window_view(values, length), axis=1)  # [windows, length]
    # np.lexsort sorts by its last key first: feed the columns weakest-last. Stable, so
    # among equal windows the lowest start comes first.
    order = np.lexsort(keys.T[::-1])
    best = int(order[0])
    if rng is None:
        return best
    ties = [int(i) for i in order if np.array_equal(keys[i], keys[best])]
    return rng.choice(ties)


def window_min(throughputs: np.ndarray, start: int, length: int) -> float:
    """The weakest block of the window [start, start + length)."""
    return float(throughputs[start : start + length].min())


def coverage_ratio(spans: Sequence[ServerSpan], total_blocks: int) -> float:
    """The swarm's weakest block relative to the ideal: all throughput spread evenly.

    1.0 means no capacity is wasted on over-served blocks; 0 means a block is missing.
    """
    ideal = sum(s.throughput * s.length for s in spans) / total_blocks
    if ideal == 0:
        return 0.0
    return float(block_throughputs(spans, total_blocks).min() / ideal)
