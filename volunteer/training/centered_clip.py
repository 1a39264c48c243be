"""CenteredClip: an aggregate of peers' vectors (gradients) that a minority of hostile
peers cannot drag far, whatever they send.

The plain mean moves without bound when one peer sends a huge vector. CenteredClip
(Karimireddy, He and Jaggi, 2021; the aggregator of BTARD) starts from the coordinate-wise
median and repeatedly moves the center by the mean of each vector's offset from it,
clipped to length `tau`: a vector within `tau` of the center pulls with its whole offset
(so, among honest peers that agree within `tau`, the result is their mean), one farther
away pulls with a unit offset times `tau`, no more. With fewer than half the peers
hostile, the center stays within a bound of the honest mean that grows with `tau` and
the honest vectors' spread, not with what the others send.

Each peer of a stage aggregates its own part of the stage's gradient this way (the
parts of a butterfly all-reduce); the peers whose offsets were still clipped at the end
are the ones worth a validator's recomputation.
"""

from __future__ import annotations

import dataclasses

import torch

ITERATIONS = 20
"""Clipped-mean steps at most (the center moves by less each step; BTARD runs a fixed
few tens)."""
STOP_SHIFT = 1e-6
"""Steps end early once the center moves by less than this share of `tau`."""


@dataclasses.dataclass(frozen=True)
class Clipped:
    """The aggregate and how it was reached."""

    center: torch.Tensor
    """The aggregate, shaped like one vector."""
    iterations: int
    """Clipped-mean steps run (fewer than asked when the center stopped moving)."""
    far: tuple[int, ...]
    """The vectors still farther than `tau` from the center at the end (by index)."""


def centered_clip(
    vectors: torch.Tensor,
    *,
    tau: float,
    weights: torch.Tensor | None = None,
    iterations: int = ITERATIONS,
) -> Clipped:
    """CenteredClip of `vectors` [peers, size] (module doc), in float64 for the sums.

    Args:
        tau: the clipping radius (> 0; infinite makes it the weighted mean).
        weights: each peer's weight (its samples, say; > 0), equal when None.
        iterations: clipped-mean steps at most (>= 1).

    Raises:
        ValueError: no vectors, a vector that is not finite, or a bad tau, weight or
            iteration count (inputs come from peers: nothing is taken on trust).
    """
    if vectors.dim() != 2 or vectors.shape[0] == 0:
        raise ValueError(f"need vectors shaped [peers, size], got {tuple(vectors.shape)}")
    if not bool(torch.isfinite(vectors).all()):
        raise ValueError("a vector has values that are not finite")
    if not tau > 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if iterations < 1:
        raise ValueError(f"iterations must be at least 1, got {iterations}")
    peers = vectors.shape[0]
    if weights is None:
        share = torch.full((peers,), 1.0 / peers, dtype=torch.float64)
    else:
        if weights.shape != (peers,) or not bool((weights > 0).all() & weights.isfinite().all()):
            raise ValueError("weights must be one positive finite number per vector")
        share = weights.to(torch.float64) / weights.to(torch.float64).sum()
    points = vectors.to(torch.float64)
    center = points.median(dim=0).values
    # Distances through |p - c|^2 = |p|^2 - 2 p.c + |c|^2 and the shift as one product:
    # two passes over the vectors per step, and no offsets array (float64 keeps the
    # cancellation far below tau).
    squares = (points * points).sum(dim=1)
    steps = 0
    while steps < iterations:
        steps += 1
        distances = (squares - 2 * (points @ center) + center @ center).clamp_min(0).sqrt()
        # A vector within tau pulls with its whole offset; a farther one with tau of it.
        pull = share * torch.where(distances > tau, tau / distances.clamp_min(1e-300), 1.0)
        shift = pull @ points - pull.sum() * center
        center = center + shift
        if float(shift.norm()) <= STOP_SHIFT * min(tau, 1.0):
            break
    distances = (points - center).norm(dim=1)
    far = tuple(int(index) for index in torch.nonzero(distances > tau).flatten())
    return Clipped(center=center.to(vectors.dtype), iterations=steps, far=far)
