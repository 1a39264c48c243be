"""A validator's verdict on a stage peer's answers (`volunteer.training.judge`): honest
answers are at rounding distance, a wrong share, wrong activations, a wrong loss or a
wrong input gradient each stand out, and malformed requests are refused."""

from __future__ import annotations

import math

import pytest
import torch

from tests.server import sub_span
from tests.training.swarm_helpers import OPTIMIZER, tiny_model
from volunteer.training import attacks
from volunteer.training.judge import TOLERANCE, distances, relative_distance
from volunteer.training.stage import StageError, StageTrainer

BATCH, SEQUENCE = 2, 5


def _stage(start: int, end: int) -> tuple[StageTrainer, object]:
    full, ends = tiny_model()
    return StageTrainer(sub_span(full, start, end), OPTIMIZER, seed=7), ends


def _honest_middle(trainer: StageTrainer) -> tuple[list[torch.Tensor], torch.Tensor]:
    """A middle stage's microbatch and the answers an honest peer gives for it."""
    hidden_size = trainer.span.config.hidden_size
    generator = torch.Generator().manual_seed(3)
    given = torch.randn(BATCH, SEQUENCE, hidden_size, generator=generator)
    grad_output = torch.randn(BATCH, SEQUENCE, hidden_size, generator=generator)
    output = trainer.forward("k", given)
    grad_in = trainer.backward("k", grad_output)
    return [given, grad_output, output, grad_in], trainer.gradient().float()


def _judge(trainer, ends, tensors, share, *, first=False, last=False, losses=None):
    return distances(
        trainer, ends, first=first, last=last, received=share, tensors=tensors,
        losses=losses, embed=lambda t: t,
    )  # fmt: skip


def test_honest_answers_are_within_rounding_and_each_lie_stands_out() -> None:
    trainer, ends = _stage(1, 3)
    tensors, share = _honest_middle(trainer)
    honest = _judge(trainer, ends, tensors, share)
    assert max(honest.values()) < TOLERANCE / 100, honest
    for index, name in ((2, "forward"), (3, "backward")):
        lied = list(tensors)
        lied[index] = attacks.noisy(lied[index], seed=1)
        verdict = _judge(trainer, ends, lied, share)
        assert verdict[name] > 0.5 and verdict["share"] < TOLERANCE, verdict
    verdict = _judge(trainer, ends, tensors, attacks.sign_flip(share))
    assert verdict["share"] > 1.5 and verdict["forward"] < TOLERANCE, verdict


def test_a_last_stage_loss_is_recomputed() -> None:
    trainer, ends = _stage(2, 4)
    generator = torch.Generator().manual_seed(5)
    given = torch.randn(BATCH, SEQUENCE, trainer.span.config.hidden_size, generator=generator)
    labels = torch.randint(0, ends.config.vocab_size, (BATCH, SEQUENCE), generator=generator)
    loss, grad_in = trainer.loss_backward("k", given, labels, ends)
    share = trainer.gradient().float()
    tensors = [given, labels, grad_in]
    assert _judge(trainer, ends, tensors, share, last=True, losses=[loss])["forward"] < 1e-6
    halved = _judge(trainer, ends, tensors, share, last=True, losses=[loss / 2])
    assert halved["forward"] == pytest.approx(0.5, rel=1e-4)


def test_malformed_requests_are_refused() -> None:
    trainer, ends = _stage(1, 3)
    tensors, share = _honest_middle(trainer)
    with pytest.raises(StageError, match="groups of 4"):
        _judge(trainer, ends, tensors[:3], share)
    with pytest.raises(StageError, match="each microbatch's loss"):
        _judge(trainer, ends, tensors[:3], share, last=True, losses=None)
    # An answer of another shape is as far as can be.
    assert relative_distance(torch.zeros(3), torch.ones(4)) == float("inf")


def test_a_distance_says_nothing_of_a_recomputation_that_is_not_finite() -> None:
    """A non-finite answer is as far as can be; a non-finite recomputation (inputs that
    overflow the blocks) gives NaN, which no check reads as right or as wrong."""
    honest = torch.ones(3)
    assert relative_distance(honest.clone(), honest) == 0.0
    assert relative_distance(torch.tensor([1.0, float("inf"), 1.0]), honest) == float("inf")
    assert relative_distance(torch.ones(4), honest) == float("inf")
    assert math.isnan(relative_distance(honest, torch.tensor([1.0, float("nan"), 1.0])))
    assert math.isnan(relative_distance(float("inf"), float("inf")))
