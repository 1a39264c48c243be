"""What a Byzantine trainer sends instead of its gradient: the attacks BTARD defends
against, for drills (`VOLUNTEER_FAULTS`) and tests only.

- sign flip: its gradient negated (and scaled);
- random direction: a long vector in a direction the attackers agreed on (a shared seed);
- label flip: an honest gradient of wrong targets (each token id mirrored in the
  vocabulary), computed as usual;
- stale: its gradient from some steps ago;
- inner-product manipulation (Xie, Koyejo and Gupta, 2020): a small negative multiple of
  the honest mean, so that the aggregate's inner product with it shrinks or turns;
- "a little is enough" (Baruch, Baruch and Goldberg, 2019): the honest mean moved by z
  standard deviations per coordinate, with z just small enough to pass for honest among
  `peers` of which `hostile` collude.

Two more strike a pipeline rather than the averaging: wrong activations (the hidden
states a peer passes on, or the loss it reports) and wrong input gradients (what it
sends back), each with noise as large as the tensor, its share left honest.

Inner-product manipulation and "a little is enough" assume attackers who know the
honest peers' gradients (their mean and spread), the strongest case the paper studies;
a drill hands in its best estimate.
"""

from __future__ import annotations

import collections
import statistics

import torch


def sign_flip(gradient: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return -scale * gradient


def random_direction(like: torch.Tensor, *, seed: int, norm: float) -> torch.Tensor:
    """A vector shaped like `like`, `norm` long, in the direction `seed` picks: every
    attacker with the seed sends the same one."""
    generator = torch.Generator().manual_seed(seed)
    direction = torch.randn(like.shape, generator=generator, dtype=torch.float64)
    return (norm * direction / direction.norm()).to(like.dtype)


def flip_labels(labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Each target token id mirrored in the vocabulary (ignored positions, < 0, kept)."""
    return torch.where(labels >= 0, vocab_size - 1 - labels, labels)


def inner_product_manipulation(honest_mean: torch.Tensor, epsilon: float = 0.1) -> torch.Tensor:
    return -epsilon * honest_mean


def alie_z(peers: int, hostile: int) -> float:
    """How many standard deviations "a little is enough" moves each coordinate: the most
    for which the hostile vectors still sit among the `peers - hostile` honest ones
    that a majority-based rule looks at (the paper's z_max)."""
    if not 0 < hostile < peers:
        raise ValueError(f"need 0 < hostile < peers, got {hostile} of {peers}")
    needed = peers // 2 + 1 - hostile  # honest peers the attackers must seem closer than
    share = (peers - needed) / peers
    return statistics.NormalDist().inv_cdf(min(max(share, 1e-6), 1 - 1e-6))


def a_little_is_enough(
    honest_mean: torch.Tensor, honest_std: torch.Tensor, *, peers: int, hostile: int
) -> torch.Tensor:
    return honest_mean - alie_z(peers, hostile) * honest_std


class Staleness:
    """Hands back the gradient of `steps` steps ago (the oldest one it has, until it has
    that many): a peer that trains on an old model and sends it late."""

    def __init__(self, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"a stale gradient is at least 1 step old, not {steps}")
        self._kept: collections.deque[torch.Tensor] = collections.deque(maxlen=steps + 1)

    def delay(self, gradient: torch.Tensor) -> torch.Tensor:
        self._kept.append(gradient.detach().clone())
        return self._kept[0]


def noisy(tensor: torch.Tensor, *, seed: int) -> torch.Tensor:
    """`tensor` plus noise of its own norm: wrong activations or input gradients."""
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
    scale = tensor.double().norm() / noise.norm().clamp(min=1e-12)
    return (tensor.double() + scale * noise).to(tensor.dtype)
