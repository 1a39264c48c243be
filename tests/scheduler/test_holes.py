"""Holes, hole moves and turns (`volunteer.scheduler.holes`), on coverage counts."""

from __future__ import annotations

import itertools
import random

import pytest
from volunteer.scheduler.holes import coverage, hole_move, holes, turn_order
from volunteer.scheduler.routing import (
    NoRouteError,
    RouteHop,
    ServerCandidate,
    first_gap,
    inference_route,
)


def test_holes_are_the_runs_of_uncovered_blocks() -> None:
    assert holes([1, 0, 0, 2, 0, 1, 0]) == [(1, 3), (4, 5), (6, 7)]
    assert holes([1, 1]) == []
    assert holes([0, 0]) == [(0, 2)]


def test_no_move_without_a_hole() -> None:
    assert hole_move(coverage([(0, 5), (0, 5), (5, 10)], 10), (0, 5)) is None


def test_a_replica_moves_to_the_start_of_the_hole() -> None:
    # 0:5 twice, 5:10 gone: the replica fills it.
    assert hole_move(coverage([(0, 5), (0, 5)], 10), (0, 5)) == 5


def test_the_only_server_of_a_block_never_moves_away_from_it() -> None:
    # Moving would trade one hole for another: no gain, and the start of flapping.
    assert hole_move(coverage([(0, 5)], 10), (0, 5)) is None
    # 0:4 is held twice but 4:6 once: the server of 0:6 cannot go past 4 to reach 8:10.
    counts = coverage([(0, 6), (0, 4)], 12)
    assert holes(counts) == [(6, 12)]
    assert hole_move(counts, (0, 6)) == 4  # keeps 4:6, covers 6:10
    assert hole_move(coverage([(0, 6), (0, 6)], 6), (0, 6)) is None  # no hole at all


def test_a_server_slides_over_keeping_the_blocks_only_it_holds() -> None:
    # 0:6 may go to 2:8: it keeps 4:6 (only it holds them), covers the hole 6:8, and
    # leaves 0:2 to the server of 0:4.
    counts = coverage([(0, 6), (0, 4), (8, 10)], 10)
    assert hole_move(counts, (0, 6)) == 2
    # A window that would leave 4:6 bare is never taken, however much hole it covers.
    counts = coverage([(0, 6), (0, 4), (8, 10)], 12)  # holes 6:8 and 10:12
    assert hole_move(counts, (0, 6)) == 2


def test_windows_line_up_at_the_start_of_the_hole() -> None:
    counts = coverage([(0, 10), (0, 10), (0, 10)], 30)
    assert hole_move(counts, (0, 10)) == 10
    counts = coverage([(0, 10), (0, 10), (0, 10), (10, 20)], 30)
    assert hole_move(counts, (0, 10)) == 20


def test_a_window_longer_than_what_is_left_ends_at_the_end() -> None:
    counts = coverage([(0, 8), (0, 8)], 10)
    assert hole_move(counts, (0, 8)) == 2


@pytest.mark.parametrize("seed", range(30))
def test_servers_taking_turns_move_exactly_as_many_as_the_hole_needs(seed: int) -> None:
    """A swarm held three deep around a hole: servers take their turns in order, each
    moving only if the hole is still open then. Exactly enough move to fill it, no block
    is left bare, each mover covers something no other server does, and looking again
    moves nobody (no flapping)."""
    rng = random.Random(seed)
    total = 24
    length = rng.choice([3, 4, 6])
    needed = rng.choice([1, 2, 3])
    hole_len = rng.randint((needed - 1) * length + 1, needed * length)
    # The regions beside the hole are empty or at least a window long.
    fits = [
        s
        for s in range(total - hole_len + 1)
        if s in (0, total - hole_len) or (s >= length and total - hole_len - s >= length)
    ]
    hole_start = rng.choice(fits)
    hole_end = hole_start + hole_len
    spans: dict[str, tuple[int, int]] = {}
    for lo, hi in ((0, hole_start), (hole_end, total)):
        # Tiles over the region, the last one ending at its end.
        for layer, s in itertools.product(range(3), range(lo, hi, length)):
            start = min(s, hi - length)
            spans[f"t{start}-{layer}"] = (start, start + length)
    order = turn_order(list(spans), (hole_start, hole_end))
    moved = []
    for peer in order:
        target = hole_move(coverage(list(spans.values()), total), spans[peer])
        if target is not None:
            spans[peer] = (target, target + length)
            moved.append(peer)
    after = coverage(list(spans.values()), total)
    assert holes(after) == []
    assert len(moved) == needed, (moved, spans)
    for peer in moved:
        others = coverage([span for name, span in spans.items() if name != peer], total)
        assert any(others[i] == 0 for i in range(*spans[peer])), (peer, spans)
    assert all(hole_move(after, span) is None for span in spans.values())


def test_the_turn_order_is_shared_and_differs_between_holes() -> None:
    peers = [f"peer{i}" for i in range(8)]
    order = turn_order(peers, (10, 20))
    assert sorted(order) == sorted(peers)
    assert turn_order(list(reversed(peers)), (10, 20)) == order
    firsts = {turn_order(peers, (start, start + 5))[0] for start in range(0, 60, 5)}
    assert len(firsts) > 2  # no peer is first at every hole


def test_no_route_names_the_first_gap() -> None:
    servers = [
        ServerCandidate(peer_id="a", start=0, end=10, throughput=10.0),
        ServerCandidate(peer_id="b", start=20, end=30, throughput=10.0),
    ]
    assert first_gap(servers, 0, 30) == (10, 20)
    assert first_gap(servers, 12, 25) == (12, 20)
    assert first_gap(servers[:1], 0, 30) == (10, 30)
    with pytest.raises(NoRouteError, match="blocks 10:20") as caught:
        inference_route(servers, 0, 30)
    assert caught.value.gap == (10, 20)
    assert inference_route(servers, 0, 10) == [RouteHop("a", 0, 10)]
    assert list(itertools.islice(holes([0]), 1)) == [(0, 1)]
