"""SWARM parallelism: which pipeline stage a training peer joins, and when peers move.

Each stage of a training pipeline is held by several peers; a stage's load is the work
queued for it (micro-batches waiting), its throughput the summed speed of its peers. A
peer joins the stage with the most load per unit of throughput (the bottleneck), and
peers move, one at a time, from the least to the most loaded stage while the imbalance
exceeds a threshold and the move makes the worst stage better.

For the training roles of a later issue; only the tests call it today.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

IMBALANCE_THRESHOLD = 0.25
"""Move peers only while the most loaded stage is 25% busier than the least."""


@dataclasses.dataclass(frozen=True)
class StagePeer:
    peer_id: str
    stage: int
    throughput: float
    """Micro-batches per second this peer processes for its stage."""


@dataclasses.dataclass(frozen=True)
class StageMove:
    peer_id: str
    from_stage: int
    to_stage: int


def stage_pressure(loads: Sequence[float], throughputs: Sequence[float]) -> list[float]:
    """Load per unit of throughput of each stage (infinite for a loaded stage with none)."""
    return [
        load / speed if speed > 0 else (float("inf") if load > 0 else 0.0)
        for load, speed in zip(loads, throughputs, strict=True)
    ]


def choose_stage(loads: Sequence[float], throughputs: Sequence[float]) -> int:
    """The stage a new peer should join: the highest load per throughput (lowest index
    on ties)."""
    if not loads:
        raise ValueError("the training swarm has no stages")
    pressure = stage_pressure(loads, throughputs)
    return max(range(len(pressure)), key=lambda stage: (pressure[stage], -stage))


def rebalance_stages(
    loads: Sequence[float],
    peers: Sequence[StagePeer],
    *,
    threshold: float = IMBALANCE_THRESHOLD,
    max_moves: int | None = None,
) -> list[StageMove]:
    """The moves that even out the stages (see the module docstring).

    Each move takes the slowest peer of the least pressed stage that has more than one
    peer to the most pressed stage, and is made only if the most pressed stage's
    pressure drops without the left stage becoming the new worst; so the moves end.
    """
    speeds = [0.0] * len(loads)
    members: list[list[StagePeer]] = [[] for _ in loads]
    for peer in sorted(peers, key=lambda p: p.peer_id):
        speeds[peer.stage] += peer.throughput
        members[peer.stage].append(peer)
    moves: list[StageMove] = []
    limit = len(peers) if max_moves is None else max_moves
    while len(moves) < limit:
        pressure = stage_pressure(loads, speeds)
        worst = max(range(len(loads)), key=lambda s: (pressure[s], -s))
        donors = [s for s in range(len(loads)) if s != worst and len(members[s]) > 1]
        if not donors:
            break
        donor = min(donors, key=lambda s: (pressure[s], s))
        if pressure[worst] <= (1 + threshold) * pressure[donor]:
            break
        peer = min(members[donor], key=lambda p: (p.throughput, p.peer_id))
        after = stage_pressure(
            [loads[donor], loads[worst]],
            [speeds[donor] - peer.throughput, speeds[worst] + peer.throughput],
        )
        if max(after) >= pressure[worst]:
            break  # the move would only shift the bottleneck
        members[donor].remove(peer)
        members[worst].append(peer)
        speeds[donor] -= peer.throughput
        speeds[worst] += peer.throughput
        moves.append(StageMove(peer.peer_id, donor, worst))
    return moves
