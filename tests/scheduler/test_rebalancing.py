"""Rebalancing: move only when the swarm gains enough; converge; never oscillate."""

from __future__ import annotations

import random

import pytest
from volunteer.scheduler.block_selection import ServerSpan, block_throughputs, coverage_ratio
from volunteer.scheduler.rebalancing import Layout, next_check_delay_s, rebalance, should_move

TOTAL = 30


def _apply(spans: list[ServerSpan], peer: str, start: int) -> list[ServerSpan]:
    return [
        ServerSpan(s.peer_id, start, start + s.length, s.throughput) if s.peer_id == peer else s
        for s in spans
    ]


def test_a_server_moves_to_fill_a_hole() -> None:
    spans = [
        ServerSpan("a", 0, 15, 10.0),
        ServerSpan("b", 0, 15, 10.0),
        ServerSpan("c", 15, 25, 10.0),  # blocks 25-29 have nobody
    ]
    decision = should_move(spans, "b", TOTAL, random.Random(0))
    assert decision.should_move
    assert decision.min_before == 0.0 and decision.min_after > 0
    assert decision.start + 15 > 25  # it now covers the hole
    assert "moving" in decision.reason


def test_a_balanced_swarm_stays_put() -> None:
    spans = [ServerSpan("a", 0, 15, 10.0), ServerSpan("b", 15, 30, 10.0)]
    for peer in ("a", "b"):
        decision = should_move(spans, peer, TOTAL, random.Random(1))
        assert not decision.should_move
        assert decision.start == {"a": 0, "b": 15}[peer]


def test_a_gain_below_the_threshold_is_not_worth_a_move() -> None:
    # b could move to the slightly weaker second half, but the swarm's weakest block
    # would gain less than the threshold asks.
    spans = [
        ServerSpan("a", 0, 15, 10.5),
        ServerSpan("b", 0, 15, 1.0),
        ServerSpan("c", 15, 30, 10.0),
    ]
    cautious = should_move(spans, "b", TOTAL, random.Random(2), min_gain=0.5)
    eager = should_move(spans, "b", TOTAL, random.Random(2), min_gain=0.0)
    assert not cautious.should_move and cautious.start == 0
    assert eager.should_move and eager.start == 15
    assert eager.min_after == pytest.approx(10.5) and eager.min_before == pytest.approx(10.0)


def test_servers_asking_in_turn_converge_and_raise_the_minimum() -> None:
    rng = random.Random(4)
    spans = [
        ServerSpan(f"p{i:02d}", 0, length, rng.uniform(1, 20))
        for i, length in enumerate(rng.choice([5, 8, 10, 15]) for _ in range(20))
    ]  # everyone piled onto the first blocks
    before = block_throughputs(spans, TOTAL).min()
    moves_per_round = []
    for _ in range(20):
        moved = 0
        for peer in sorted(s.peer_id for s in spans):
            decision = should_move(spans, peer, TOTAL, rng)
            if decision.should_move:
                spans = _apply(spans, peer, decision.start)
                moved += 1
        moves_per_round.append(moved)
        if moved == 0:
            break
    assert moves_per_round[-1] == 0, moves_per_round  # converged: nobody wants to move
    assert block_throughputs(spans, TOTAL).min() > before == 0.0
    assert coverage_ratio(spans, TOTAL) > 0.3


def test_greedy_rebalancing_stops_and_a_second_run_moves_nobody() -> None:
    rng = random.Random(5)
    for _ in range(20):
        spans = [
            ServerSpan(f"p{i}", start, start + length, rng.uniform(1, 10))
            for i in range(40)
            for length in [rng.randint(1, 12)]
            for start in [rng.randint(0, TOTAL - length)]
        ]
        layout = Layout.of(spans, TOTAL)
        rebalance(layout, rng)
        settled = list(layout.starts)
        assert rebalance(layout, rng) == 0
        assert layout.starts == settled


def test_should_move_is_deterministic_given_its_rng() -> None:
    spans = [ServerSpan("a", 0, 10, 5.0), ServerSpan("b", 0, 10, 5.0), ServerSpan("c", 0, 10, 1.0)]
    first = should_move(spans, "a", TOTAL, random.Random(9))
    assert first == should_move(spans, "a", TOTAL, random.Random(9))
    with pytest.raises(ValueError):
        should_move(spans, "nobody", TOTAL, random.Random(9))


def test_the_check_interval_is_randomised_around_its_mean() -> None:
    rng = random.Random(6)
    delays = [next_check_delay_s(rng, 300.0) for _ in range(500)]
    assert all(150.0 <= d <= 450.0 for d in delays)
    assert max(delays) - min(delays) > 200.0
