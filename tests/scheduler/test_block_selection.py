"""Block selection: join where the swarm is weakest, deterministically."""

from __future__ import annotations

import random

import numpy as np
import pytest
from volunteer.scheduler.block_selection import (
    ServerSpan,
    block_throughputs,
    choose_best_start,
    coverage_ratio,
)


def test_an_empty_swarm_is_joined_at_the_start() -> None:
    assert choose_best_start([0.0] * 30, 10) == 0


def test_the_window_holding_the_weakest_block_wins() -> None:
    throughputs = [5.0] * 30
    throughputs[22] = 1.0
    start = choose_best_start(throughputs, 10)
    assert start <= 22 < start + 10


def test_among_windows_with_the_same_weakest_block_the_next_weakest_decides() -> None:
    # Blocks 0-9 and 20-29 both have a 0; 20-29's second weakest is weaker.
    throughputs = [3.0] * 10 + [9.0] * 10 + [2.0] * 10
    throughputs[0] = throughputs[29] = 0.0
    assert choose_best_start(throughputs, 10) == 20


def test_it_matches_a_brute_force_over_sorted_windows() -> None:
    rng = random.Random(3)
    for _ in range(300):
        total = rng.randint(1, 40)
        length = rng.randint(1, total)
        values = [float(rng.choice([0, 1, 2, 3, rng.random() * 10])) for _ in range(total)]
        expected = min(range(total - length + 1), key=lambda i: (sorted(values[i : i + length]), i))
        assert choose_best_start(values, length) == expected


def test_ties_are_broken_by_the_rng_and_only_among_equal_windows() -> None:
    values = [0.0] * 10 + [4.0] * 10 + [0.0] * 10
    seen = {choose_best_start(values, 10, random.Random(seed)) for seed in range(40)}
    assert seen == {0, 20}
    assert choose_best_start(values, 10, random.Random(5)) == choose_best_start(
        values, 10, random.Random(5)
    )


def test_block_throughputs_sum_servers_and_do_not_depend_on_order() -> None:
    spans = [ServerSpan("b", 0, 3, 1.5), ServerSpan("a", 2, 5, 0.25), ServerSpan("c", 4, 5, 2.0)]
    expected = np.array([1.5, 1.5, 1.75, 0.25, 2.25])
    assert np.array_equal(block_throughputs(spans, 5), expected)
    assert np.array_equal(block_throughputs(spans[::-1], 5), expected)
    with pytest.raises(ValueError):
        block_throughputs([ServerSpan("a", 0, 6, 1.0)], 5)


def test_coverage_is_one_when_spread_evenly_and_zero_with_a_hole() -> None:
    even = [ServerSpan("a", 0, 5, 2.0), ServerSpan("b", 5, 10, 2.0)]
    assert coverage_ratio(even, 10) == pytest.approx(1.0)
    holed = [ServerSpan("a", 0, 5, 2.0), ServerSpan("b", 0, 9, 2.0)]
    assert coverage_ratio(holed, 10) == 0.0


def test_bad_spans_are_refused() -> None:
    with pytest.raises(ValueError):
        ServerSpan("a", 3, 3, 1.0)
    with pytest.raises(ValueError):
        ServerSpan("a", 0, 3, float("nan"))
    with pytest.raises(ValueError):
        choose_best_start([1.0, 2.0], 3)
