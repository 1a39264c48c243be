"""CenteredClip (`volunteer.training.centered_clip`): the mean where peers agree, and a
minority of hostile peers cannot drag it far."""

from __future__ import annotations

import math

import pytest
import torch

from volunteer.training.centered_clip import centered_clip

SIZE = 200


def _honest(peers: int, seed: int, spread: float = 0.05) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    mean = torch.randn(SIZE, generator=generator)
    return mean + spread * torch.randn(peers, SIZE, generator=generator)


def test_an_infinite_tau_gives_the_mean_and_weights_weigh() -> None:
    vectors = _honest(5, seed=1, spread=1.0)
    result = centered_clip(vectors, tau=math.inf)
    torch.testing.assert_close(result.center, vectors.mean(0), rtol=0, atol=1e-6)
    assert result.far == ()
    weights = torch.tensor([1.0, 2.0, 3.0, 4.0, 10.0])
    weighted = centered_clip(vectors, tau=math.inf, weights=weights)
    expected = (weights.unsqueeze(1) * vectors).sum(0) / weights.sum()
    torch.testing.assert_close(weighted.center, expected, rtol=0, atol=1e-6)


def test_peers_that_agree_within_tau_get_their_mean() -> None:
    vectors = _honest(6, seed=2)  # offsets from the mean of about 0.05 * sqrt(200) = 0.7
    result = centered_clip(vectors, tau=10.0)
    torch.testing.assert_close(result.center, vectors.mean(0), rtol=0, atol=1e-5)
    assert result.iterations < 20  # the center stopped moving before the last step


@pytest.mark.parametrize("attack", ["huge", "opposite", "random"])
def test_a_hostile_minority_moves_the_center_less_than_tau(attack: str) -> None:
    honest = _honest(7, seed=3)
    honest_mean = honest.mean(0)
    generator = torch.Generator().manual_seed(4)
    if attack == "huge":  # one direction, far away
        hostile = honest_mean + 1e6 * torch.ones(3, SIZE)
    elif attack == "opposite":  # the sign of the honest mean flipped, scaled up
        hostile = -100.0 * honest_mean.expand(3, SIZE)
    else:
        hostile = 1e3 * torch.randn(3, SIZE, generator=generator)
    vectors = torch.cat([honest, hostile])
    tau = 1.0
    result = centered_clip(vectors, tau=tau)
    drift = float((result.center - honest_mean).norm())
    assert drift < tau, drift
    assert float((vectors.mean(0) - honest_mean).norm()) > 100 * tau  # the mean is lost
    assert result.far == (7, 8, 9)


def test_shifting_every_vector_shifts_the_center() -> None:
    vectors = torch.cat([_honest(5, seed=5), 50 * torch.ones(2, SIZE)])
    offset = torch.randn(SIZE, generator=torch.Generator().manual_seed(6))
    moved = centered_clip(vectors + offset, tau=0.5).center
    torch.testing.assert_close(moved, centered_clip(vectors, tau=0.5).center + offset)


@pytest.mark.parametrize(
    ("vectors", "kwargs", "says"),
    [
        (torch.zeros(0, SIZE), {}, "peers, size"),
        (torch.zeros(SIZE), {}, "peers, size"),
        (torch.tensor([[1.0, math.nan]]), {}, "not finite"),
        (torch.tensor([[1.0, math.inf]]), {}, "not finite"),
        (torch.ones(2, 3), {"tau": 0.0}, "tau"),
        (torch.ones(2, 3), {"tau": math.nan}, "tau"),
        (torch.ones(2, 3), {"iterations": 0}, "iterations"),
        (torch.ones(2, 3), {"weights": torch.tensor([1.0, 0.0])}, "weights"),
        (torch.ones(2, 3), {"weights": torch.tensor([1.0])}, "weights"),
        (torch.ones(2, 3), {"weights": torch.tensor([1.0, math.inf])}, "weights"),
    ],
)
def test_bad_input_is_refused_with_a_reason(vectors: torch.Tensor, kwargs: dict, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        centered_clip(vectors, **{"tau": 1.0, **kwargs})
