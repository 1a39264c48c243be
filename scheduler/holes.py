"""Holes in a swarm (blocks that no server covers), and who fills one, and where.

A periodic check (`volunteer.scheduler.rebalancing`) weighs throughput and moves rarely;
a hole stops every client, so it is filled as soon as it is seen. Two rules keep that
safe:

- Only a move that covers a block nobody covers, and uncovers none, is made: each hole
  move lowers the count of uncovered blocks, so servers cannot bounce between spans
  (the hysteresis of periodic checks, made strict).
- The servers that could fill a hole take turns: each derives the same order from the
  same records (`turn_order`), the first moves at once and says so (JOINING), and each
  later one looks again when its turn comes. So one hole draws the servers it needs, not
  every server that saw it.

Everything here works on coverage counts (servers per block), which the caller builds
from the records it trusts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

Span = tuple[int, int]
"""Blocks `[start, end)`."""


def coverage(spans: Sequence[Span], total: int) -> list[int]:
    """How many of `spans` hold each of `total` blocks."""
    counts = [0] * total
    for start, end in spans:
        for index in range(start, end):
            counts[index] += 1
    return counts


def holes(counts: Sequence[int]) -> list[Span]:
    """The runs of blocks that no server covers, in order."""
    runs: list[Span] = []
    for index, count in enumerate(counts):
        if count > 0:
            continue
        if runs and runs[-1][1] == index:
            runs[-1] = (runs[-1][0], index + 1)
        else:
            runs.append((index, index + 1))
    return runs


def hole_move(counts: Sequence[int], span: Span) -> int | None:
    """Where the server of `span` (counted in `counts`) should move, keeping its length,
    to cover the most blocks that nobody covers; None when there is no hole, or every
    move that would cover some of it uncovers a block it leaves.

    Among equally good windows it takes the one starting where a hole starts, then the
    one ending where a hole ends, then the lowest: servers filling one hole in turns
    then line up behind each other instead of overlapping.
    """
    start, end = span
    length = end - start
    runs = holes(counts)
    if not runs:
        return None
    others = list(counts)
    for index in range(start, end):
        others[index] -= 1
    starts = {run[0] for run in runs}
    ends = {run[1] for run in runs}

    def preference(window: int) -> tuple[int, bool, bool, int]:
        left = [i for i in range(start, end) if not window <= i < window + length]
        if any(others[i] < 1 for i in left):
            return 0, False, False, -window  # it would open a hole of its own
        gained = sum(1 for count in counts[window : window + length] if count == 0)
        return gained, window in starts, window + length in ends, -window

    best = max(range(len(counts) - length + 1), key=preference)
    return best if preference(best)[0] > 0 else None


def turn_order(candidates: Sequence[str], hole: Span) -> list[str]:
    """The order in which `candidates` (peer ids) take their turn at `hole`: a hash of
    both, the same for every server, and a different first server for each hole (no
    peer is always first, so a dead or stuck one delays only some holes)."""

    def key(peer_id: str) -> bytes:
        return hashlib.sha256(f"{hole[0]}:{hole[1]}:{peer_id}".encode()).digest()

    return sorted(candidates, key=key)
