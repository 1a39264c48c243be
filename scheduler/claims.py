"""How fast routing takes a server to be: what the client measured, else its claim, checked.

A record's throughput is whatever its author wrote, so routing treats it as a prior only:

- a server the client has measured counts at its measured speed, whatever it claims;
- a server not measured yet (a newcomer) counts at its claim, in the units measured
  (`calibration`), capped twice: by what the fastest machine of the hardware class its
  record states could do for this model (`plausible_throughput`), and by its probation
  ceiling, a share of the low median measured peer (`PROBATION_FACTOR`; the low median
  of the capped claims while nobody is measured). A lying newcomer thus draws routes
  only as a modest server would, until the client has timed it.

Speeds are tokens per second per block. Records state a decode speed; a client also
times other work (a forward of many tokens costs far less per token), and its timings
include what a server's claim leaves out. So a claim is first scaled by how the measured
servers' own claims compare with what was measured of them: a claim tells how a
newcomer compares with its peers, not what it will measure.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Iterable, Mapping

DEVICE_PEAK_FLOPS: Mapping[str, float] = {"cpu": 1e15, "gpu": 1e17}
"""Peak FLOP/s of the fastest machine of each hardware class a record may state, with
room to spare: two sockets of the largest server CPUs with matrix units (cpu), and a
node of eight of the fastest accelerators at their lowest precision (gpu). A claim above
it is a lie on any machine of the class; one below it may still be, which is what
measuring is for."""
UNKNOWN_DEVICE_PEAK_FLOPS = max(DEVICE_PEAK_FLOPS.values())
"""A class we do not know (or none stated) is bounded like the fastest class."""
PROBATION_FACTOR = 0.5
"""A newcomer counts as at most this share of the low median measured peer where the
fastest route is taken (inference): on par, its lower round trip alone would win it every
route; below, it is routed to where it is needed, or when the client tries newcomers (a
small share of routes)."""
DRAWN_PROBATION_FACTOR = 1.0
"""The same where servers are drawn at random by speed (forward/backward): on par with
the typical measured peer, a newcomer draws a typical share, and its first call
measures it."""


def block_flops_per_token(
    *, hidden_size: int, intermediate_size: int, num_heads: int, num_kv_heads: int, head_dim: int
) -> float:
    """The least work one token costs one Llama-style block: two FLOPs per weight of its
    projections (attention over the context comes on top, so this is a lower bound)."""
    q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
    attention = hidden_size * (2 * q_size + 2 * kv_size)  # q and o; k and v
    mlp = 3 * hidden_size * intermediate_size  # gate, up and down
    return 2.0 * (attention + mlp)


def plausible_throughput(flops_per_token: float | None, device_class: str | None) -> float:
    """The most tokens per second per block a server of `device_class` could run blocks
    costing `flops_per_token` each at (inf when the cost is unknown)."""
    if flops_per_token is None or not flops_per_token > 0:
        return math.inf
    peak = DEVICE_PEAK_FLOPS.get(device_class or "", UNKNOWN_DEVICE_PEAK_FLOPS)
    return peak / flops_per_token


@dataclasses.dataclass(frozen=True)
class SpeedEvidence:
    """What a client knows of one server's speed."""

    peer_id: str
    claimed: float
    """The throughput its record states."""
    bound: float
    """`plausible_throughput` for the model and the hardware class its record states."""
    measured: float | None = None
    """What the client timed (None: a newcomer, not measured yet)."""


def routing_speeds(
    evidence: Iterable[SpeedEvidence],
    *,
    on_probation: bool = True,
    probation_factor: float = PROBATION_FACTOR,
) -> dict[str, float]:
    """The speed routing counts for each server (see the module docstring).

    Args:
        evidence: one entry per server.
        on_probation: cap newcomers by the probation ceiling; False judges them by their
            claims within the plausible bound, which is how a client tries newcomers.
        probation_factor: the ceiling's share of the low median measured peer
            (`PROBATION_FACTOR` or `DRAWN_PROBATION_FACTOR`).

    Returns:
        peer id -> tokens per second per block (0 for a server that claims 0 and was
        never measured: unusable).
    """
    known = list(evidence)
    measured = [min(e.measured, e.bound) for e in known if e.measured is not None]
    scale = calibration(known)
    if not on_probation:
        ceiling = math.inf
    elif measured:
        ceiling = probation_factor * statistics.median_low(measured)
    elif known:
        # Nobody measured yet: no newcomer counts above a typical claim, so liars need a
        # majority of the records to be believed.
        ceiling = statistics.median_low([min(e.claimed, e.bound) for e in known])
    else:
        ceiling = math.inf
    return {
        e.peer_id: (
            min(e.measured, e.bound)
            if e.measured is not None
            else min(scale * e.claimed, e.bound, ceiling)
        )
        for e in known
    }


def calibration(evidence: Iterable[SpeedEvidence]) -> float:
    """What a claim is worth in measured units: the low median, over the measured
    servers that claim anything, of measured speed over claim (1 with none)."""
    ratios = [
        min(e.measured, e.bound) / e.claimed
        for e in evidence
        if e.measured is not None and e.claimed > 0
    ]
    return statistics.median_low(ratios) if ratios else 1.0
