"""The training attacks (`volunteer.training.attacks`) do what their papers say, and
CenteredClip keeps the blunt ones (from one peer in three) within tau of the honest mean."""

from __future__ import annotations

import pytest
import torch

from volunteer.training import attacks
from volunteer.training.centered_clip import centered_clip

SIZE = 500


def _honest(peers: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(SIZE, generator=generator) + 0.05 * torch.randn(
        peers, SIZE, generator=generator
    )


def test_sign_flip_and_ipm_turn_against_the_honest_mean() -> None:
    mean = _honest(4, seed=1).mean(0)
    assert torch.equal(attacks.sign_flip(mean, 3.0), -3.0 * mean)
    ipm = attacks.inner_product_manipulation(mean, epsilon=0.2)
    assert float(ipm @ mean) < 0
    assert float(ipm.norm()) == pytest.approx(0.2 * float(mean.norm()))


def test_colluding_attackers_share_a_random_direction_of_the_norm_asked() -> None:
    like = torch.zeros(SIZE)
    one, two = (attacks.random_direction(like, seed=9, norm=50.0) for _ in range(2))
    assert torch.equal(one, two)
    assert float(one.norm()) == pytest.approx(50.0, rel=1e-5)
    assert not torch.equal(one, attacks.random_direction(like, seed=10, norm=50.0))


def test_label_flip_mirrors_targets_and_keeps_ignored_positions() -> None:
    labels = torch.tensor([0, 5, 99, -100])
    flipped = attacks.flip_labels(labels, vocab_size=100)
    assert flipped.tolist() == [99, 94, 0, -100]
    assert torch.equal(attacks.flip_labels(flipped, vocab_size=100), labels)


def test_alie_moves_each_coordinate_by_z_standard_deviations() -> None:
    # Baruch et al.: s = floor(n / 2 + 1) - m honest workers to outdo, z = Phi^-1((n - s) / n):
    # n = 50, m = 24 -> s = 2, Phi^-1(0.96).
    assert attacks.alie_z(50, 24) == pytest.approx(1.7507, abs=1e-3)
    assert attacks.alie_z(3, 1) == pytest.approx(0.4307, abs=1e-3)
    honest = _honest(6, seed=2)
    mean, std = honest.mean(0), honest.std(0)
    sent = attacks.a_little_is_enough(mean, std, peers=9, hostile=3)
    torch.testing.assert_close((mean - sent) / std, torch.full((SIZE,), attacks.alie_z(9, 3)))
    with pytest.raises(ValueError):
        attacks.alie_z(3, 3)


def test_staleness_sends_the_gradient_of_steps_ago() -> None:
    stale = attacks.Staleness(2)
    sent = [stale.delay(torch.full((2,), float(step))) for step in range(5)]
    assert [float(each[0]) for each in sent] == [0, 0, 0, 1, 2]
    with pytest.raises(ValueError):
        attacks.Staleness(0)


@pytest.mark.parametrize("attack", ["sign-flip", "random-direction", "ipm"])
def test_centered_clip_keeps_one_attacker_in_three_within_tau(attack: str) -> None:
    honest = _honest(2, seed=3)  # offsets from their mean of about 0.05 * sqrt(500) = 1.1
    mean = honest.mean(0)
    if attack == "sign-flip":
        hostile = attacks.sign_flip(honest[0], scale=10.0)
    elif attack == "random-direction":
        hostile = attacks.random_direction(mean, seed=4, norm=1e4)
    else:
        hostile = attacks.inner_product_manipulation(mean, epsilon=50.0)
    tau = 2.0
    result = centered_clip(torch.stack([honest[0], honest[1], hostile]), tau=tau)
    assert float((result.center - mean).norm()) < tau
    assert result.far == (2,)
