"""SWARM training stages: join the bottleneck; move peers until the stages even out."""

from __future__ import annotations

import random

from volunteer.scheduler.training import StagePeer, choose_stage, rebalance_stages, stage_pressure


def test_a_new_peer_joins_the_stage_with_the_most_load_per_throughput() -> None:
    assert choose_stage([10.0, 40.0, 10.0], [5.0, 10.0, 1.0]) == 2
    assert choose_stage([1.0, 1.0], [2.0, 2.0]) == 0
    assert choose_stage([0.0, 3.0, 5.0], [1.0, 0.0, 100.0]) == 1  # loaded, nobody serving


def test_moves_even_out_the_stages_and_end() -> None:
    rng = random.Random(1)
    for _ in range(50):
        stages = rng.randint(2, 6)
        loads = [rng.uniform(1, 100) for _ in range(stages)]
        peers = [
            StagePeer(f"p{i:02d}", rng.randrange(stages), rng.uniform(0.5, 5))
            for i in range(rng.randint(stages, 40))
        ]
        speeds = [sum(p.throughput for p in peers if p.stage == s) for s in range(stages)]
        worst_before = max(stage_pressure(loads, speeds))
        moves = rebalance_stages(loads, peers)
        moved = {m.peer_id: m.to_stage for m in moves}
        after = [StagePeer(p.peer_id, moved.get(p.peer_id, p.stage), p.throughput) for p in peers]
        speeds_after = [sum(p.throughput for p in after if p.stage == s) for s in range(stages)]
        assert max(stage_pressure(loads, speeds_after)) <= worst_before
        assert rebalance_stages(loads, after) == []  # settled: no further moves
        assert len(moves) <= len(peers)


def test_no_move_within_the_threshold_or_from_a_lone_peer() -> None:
    loads = [10.0, 11.0]
    peers = [StagePeer("a", 0, 1.0), StagePeer("b", 0, 1.0), StagePeer("c", 1, 2.0)]
    assert rebalance_stages(loads, peers) == []
    lone = [StagePeer("a", 0, 1.0), StagePeer("b", 1, 1.0)]
    assert rebalance_stages([1.0, 100.0], lone) == []
