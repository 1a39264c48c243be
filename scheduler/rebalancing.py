"""Whether a serving server should move to other blocks, and the swarm's greedy reaction.

Every few minutes (a randomised interval, so servers do not all move at once) a server
asks: if I moved to where the swarm is weakest now, and every other server then moved
greedily as well, would the swarm's weakest block gain more than `min_gain`? Only then
does it move. Two kinds of hysteresis keep the swarm from oscillating: the whole-swarm
gain threshold, and, for each greedy step, a move only to a window whose weakest block
is weaker than the current one's by a `margin`.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
from volunteer.scheduler.block_selection import (
    ServerSpan,
    block_throughputs,
    choose_best_start,
    window_min,
)

MIN_GAIN = 0.2
"""Move only when the swarm's weakest block would be 20% faster afterwards."""
STEP_MARGIN = 0.05
"""A greedy step moves only to a window at least 5% weaker than the one it leaves."""
MAX_SWEEPS = 8
"""Rounds of the other servers' simulated reaction (each server once per round)."""


@dataclasses.dataclass(frozen=True)
class MoveDecision:
    """The answer to "should I move?", with the numbers behind it."""

    should_move: bool
    start: int
    """Where to go (the current start when staying)."""
    min_before: float
    """The swarm's weakest block now (tokens/s)."""
    min_after: float
    """The same after the move and the others' simulated reaction."""
    reason: str


@dataclasses.dataclass
class Layout:
    """A mutable working copy of a swarm: where each server sits, and the block sums."""

    starts: list[int]
    lengths: list[int]
    speeds: list[float]
    throughputs: np.ndarray

    @classmethod
    def of(cls, spans: Sequence[ServerSpan], total_blocks: int) -> Layout:
        return cls(
            starts=[s.start for s in spans],
            lengths=[s.length for s in spans],
            speeds=[s.throughput for s in spans],
            throughputs=block_throughputs(spans, total_blocks),
        )

    def remove(self, index: int) -> None:
        start = self.starts[index]
        self.throughputs[start : start + self.lengths[index]] -= self.speeds[index]

    def place(self, index: int, start: int) -> None:
        self.starts[index] = start
        self.throughputs[start : start + self.lengths[index]] += self.speeds[index]

    def greedy_step(self, index: int, margin: float) -> bool:
        """Moves server `index` to the weakest window if that is `margin` weaker than its
        own; returns whether it moved."""
        self.remove(index)
        old, length = self.starts[index], self.lengths[index]
        # Ties go to the lowest start: random picks among equal windows would scatter
        # servers into overlapping, misaligned spans that leave holes between them.
        new = choose_best_start(self.throughputs, length)
        moved = new != old and window_min(self.throughputs, new, length) < (
            window_min(self.throughputs, old, length) * (1 - margin)
        )
        self.place(index, new if moved else old)
        return moved

    def sweep(self, order: Sequence[int], margin: float) -> int:
        """One greedy step for each server in `order`; returns how many moved."""
        return sum(self.greedy_step(index, margin) for index in order)


def rebalance(
    layout: Layout,
    rng: random.Random,
    *,
    skip: int | None = None,
    margin: float = STEP_MARGIN,
    max_sweeps: int = MAX_SWEEPS,
) -> int:
    """Lets every server (but `skip`) move greedily, in a random order each sweep (`rng`'s
    only use), until a sweep moves nobody or `max_sweeps` ran; returns the moves made."""
    indices = [i for i in range(len(layout.starts)) if i != skip]
    moves = 0
    for _ in range(max_sweeps):
        order = indices[:]
        rng.shuffle(order)
        moved = layout.sweep(order, margin)
        moves += moved
        if moved == 0:
            break
    return moves


def should_move(
    spans: Sequence[ServerSpan],
    me: str,
    total_blocks: int,
    rng: random.Random,
    *,
    min_gain: float = MIN_GAIN,
    margin: float = STEP_MARGIN,
    max_sweeps: int = MAX_SWEEPS,
) -> MoveDecision:
    """Decides whether the server `me` (one of `spans`) should move (see the module doc).

    Raises:
        ValueError: `me` is not among `spans`.
    """
    ordered = sorted(spans, key=lambda s: s.peer_id)
    index = next((i for i, s in enumerate(ordered) if s.peer_id == me), None)
    if index is None:
        raise ValueError(f"{me} is not among the swarm's servers")
    layout = Layout.of(ordered, total_blocks)
    before = float(layout.throughputs.min())
    old = layout.starts[index]
    layout.remove(index)
    new = choose_best_start(layout.throughputs, layout.lengths[index])
    if new == old:
        layout.place(index, old)
        return MoveDecision(False, old, before, before, "already where the swarm is weakest")
    layout.place(index, new)
    rebalance(layout, rng, skip=index, margin=margin, max_sweeps=max_sweeps)
    after = float(layout.throughputs.min())
    gain_ok = after > before * (1 + min_gain) if before > 0 else after > 0
    verdict = "moving" if gain_ok else "staying"
    reason = (
        f"{verdict}: blocks {new}:{new + layout.lengths[index]} would take the swarm's "
        f"weakest block from {before:.3g} to {after:.3g} tokens/s "
        f"(threshold +{min_gain:.0%})"
    )
    return MoveDecision(gain_ok, new if gain_ok else old, before, after, reason)


def next_check_delay_s(rng: random.Random, mean_s: float) -> float:
    """Seconds until the next "should I move?": uniform within ±50% of `mean_s`."""
    return mean_s * rng.uniform(0.5, 1.5)
