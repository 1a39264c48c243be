"""A swarm at internet scale, simulated with the scheduler's own decisions (no processes).

Volunteers with a realistic mix of hardware join one after another; each takes as many
blocks as fit in the memory it lends (`block_capacity`) where the swarm is weakest
(`choose_best_start`). Then a share of them leaves at random, and the rest rebalance
(`rebalance`: the greedy moves the servers make). After each phase: the swarm's weakest
block relative to the ideal, all throughput spread evenly (`coverage_ratio`).

A server's `throughput` is tokens/s through each of its blocks: its compute speed per
block divided by how many blocks it holds (a token crosses them one after another),
capped by its network.

For scale checks: the tests and `bench/scheduler_decisions.py` run it, the daemon does not.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence

import numpy as np
from volunteer.scheduler.block_selection import ServerSpan, choose_best_start, coverage_ratio
from volunteer.scheduler.capacity import BlockFootprint, MemoryBudget, block_capacity
from volunteer.scheduler.rebalancing import Layout, rebalance

GIB = 2**30


@dataclasses.dataclass(frozen=True)
class HardwareKind:
    """A kind of volunteer machine, with the ranges its figures are drawn from."""

    name: str
    share: float
    """Fraction of volunteers of this kind."""
    memory_gib: tuple[float, float]
    """Memory lent to the blocks (RAM without a GPU, else GPU memory)."""
    block_speed: tuple[float, float]
    """Tokens/s one block runs at (one-token inference)."""
    network_tps: tuple[float, float]
    """Tokens/s the volunteer's link carries (hidden states in and out)."""


REALISTIC_MIX = (
    HardwareKind("laptop, no GPU", 0.30, (4, 12), (1.0, 4.0), (20, 200)),
    HardwareKind("8 GB gaming GPU", 0.25, (6, 7.5), (40, 90), (50, 500)),
    HardwareKind("12-16 GB GPU", 0.20, (10, 15), (60, 140), (50, 800)),
    HardwareKind("24 GB GPU", 0.15, (20, 23), (100, 220), (100, 1000)),
    HardwareKind("40-80 GB datacenter GPU", 0.10, (38, 78), (200, 450), (500, 3000)),
)
"""From laptops without a GPU to 80 GB cards, as a public swarm sees them."""


@dataclasses.dataclass(frozen=True)
class Volunteer:
    peer_id: str
    kind: str
    memory_bytes: int
    block_speed: float
    network_tps: float


SEVENTY_B_BLOCK = BlockFootprint(
    weight_bytes=int(0.9 * GIB),  # a 70B model's block in 8 bits
    cache_bytes_per_token=2 * 8 * 128 * 2,  # K and V, 8 KV heads of 128, fp16
)


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """The served model as the scheduler sees it."""

    total_blocks: int = 80
    footprint: BlockFootprint = dataclasses.field(default_factory=lambda: SEVENTY_B_BLOCK)
    cache_tokens: int = 16384


@dataclasses.dataclass(frozen=True)
class SimulationResult:
    volunteers: int
    servers: int
    """Volunteers that could hold at least one block."""
    left: int
    coverage_after_join: float
    coverage_after_churn: float
    coverage_after_rebalance: float
    moves: int
    """Servers that changed span while rebalancing."""


def draw_volunteers(
    count: int, rng: random.Random, mix: Sequence[HardwareKind] = REALISTIC_MIX
) -> list[Volunteer]:
    """`count` volunteers whose hardware follows `mix`."""
    kinds = rng.choices(list(mix), weights=[k.share for k in mix], k=count)
    return [
        Volunteer(
            peer_id=f"peer{index:06d}",
            kind=kind.name,
            memory_bytes=int(rng.uniform(*kind.memory_gib) * GIB),
            block_speed=rng.uniform(*kind.block_speed),
            network_tps=rng.uniform(*kind.network_tps),
        )
        for index, kind in enumerate(kinds)
    ]


def join_all(
    volunteers: Sequence[Volunteer], model: ModelShape, rng: random.Random
) -> list[ServerSpan]:
    """Volunteers join one after another, each where the swarm is weakest then; those
    that cannot hold one block stay out."""
    layout = Layout(starts=[], lengths=[], speeds=[], throughputs=np.zeros(model.total_blocks))
    peers: list[str] = []
    for volunteer in volunteers:
        capacity = block_capacity(
            model.footprint,
            MemoryBudget(available_bytes=volunteer.memory_bytes),
            cache_tokens=model.cache_tokens,
            total_blocks=model.total_blocks,
        )
        if capacity.num_blocks == 0:
            continue
        length = capacity.num_blocks
        speed = min(volunteer.block_speed / length, volunteer.network_tps)
        start = choose_best_start(layout.throughputs, length)
        layout.starts.append(start)
        layout.lengths.append(length)
        layout.speeds.append(speed)
        layout.place(len(peers), start)
        peers.append(volunteer.peer_id)
    return _spans(layout, peers)


def simulate(
    count: int,
    *,
    seed: int = 0,
    model: ModelShape = ModelShape(),
    leave_share: float = 0.3,
) -> SimulationResult:
    """Join `count` volunteers, drop `leave_share` of them at random, then rebalance."""
    rng = random.Random(seed)
    spans = join_all(draw_volunteers(count, rng), model, rng)
    after_join = coverage_ratio(spans, model.total_blocks)
    leaving = set(rng.sample(range(len(spans)), round(len(spans) * leave_share)))
    staying = [span for index, span in enumerate(spans) if index not in leaving]
    after_churn = coverage_ratio(staying, model.total_blocks)
    layout = Layout.of(staying, model.total_blocks)
    moves = rebalance(layout, rng)
    rebalanced = _spans(layout, [span.peer_id for span in staying])
    return SimulationResult(
        volunteers=count,
        servers=len(spans),
        left=len(leaving),
        coverage_after_join=after_join,
        coverage_after_churn=after_churn,
        coverage_after_rebalance=coverage_ratio(rebalanced, model.total_blocks),
        moves=moves,
    )


def _spans(layout: Layout, peers: Sequence[str]) -> list[ServerSpan]:
    return [
        ServerSpan(peer_id=peer, start=start, end=start + length, throughput=speed)
        for peer, start, length, speed in zip(
            peers, layout.starts, layout.lengths, layout.speeds, strict=True
        )
    ]
