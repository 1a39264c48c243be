"""Sampling against transformers' logits processors, and reproducibility by seed."""

from __future__ import annotations

import pytest
import torch
import transformers  # the test extra installs it: a missing reference is an error, not a skip
from volunteer.models.sampling import (
    Sampler,
    SamplingParams,
    apply_repetition_penalty,
    keep_top_k,
    keep_top_p,
)


def _logits(rows: int = 3, vocab: int = 50) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3


def test_greedy_is_argmax() -> None:
    logits = _logits()
    context = torch.zeros(3, 1, dtype=torch.long)
    chosen = Sampler(SamplingParams(temperature=0))(logits, context)
    assert torch.equal(chosen, logits.argmax(-1))


@pytest.mark.parametrize("penalty", [0.8, 1.3])
def test_repetition_penalty_matches_transformers(penalty: float) -> None:
    logits, context = _logits(), torch.tensor([[1, 4, 4], [0, 2, 3], [7, 8, 9]])
    expected = transformers.RepetitionPenaltyLogitsProcessor(penalty)(context, logits.clone())
    assert torch.allclose(apply_repetition_penalty(logits, context, penalty), expected)


@pytest.mark.parametrize("k", [1, 5, 49])
def test_top_k_matches_transformers(k: int) -> None:
    logits = _logits()
    expected = transformers.TopKLogitsWarper(k)(None, logits.clone())
    assert torch.equal(keep_top_k(logits, k), expected)


@pytest.mark.parametrize("p", [0.05, 0.5, 0.9])
def test_top_p_matches_transformers(p: float) -> None:
    logits = _logits()
    expected = transformers.TopPLogitsWarper(p)(None, logits.clone())
    actual = keep_top_p(logits, p)
    assert torch.equal(torch.isinf(actual), torch.isinf(expected))


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([[0.5, 0.3, 0.2]]).log()
    kept = ~torch.isinf(keep_top_p(logits, 0.7))
    assert kept.tolist() == [[True, True, False]]


def test_seed_reproduces_and_differs() -> None:
    logits = torch.zeros(1, 1000)
    context = torch.zeros(1, 1, dtype=torch.long)

    def draw(seed: int) -> list[int]:
        sampler = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [int(sampler(logits, context)) for _ in range(20)]

    assert draw(3) == draw(3)
    assert draw(3) != draw(4)


def test_top_k_one_is_greedy_even_when_hot() -> None:
    logits = _logits()
    sampler = Sampler(SamplingParams(temperature=5.0, top_k=1, seed=0))
    for _ in range(5):
        assert torch.equal(sampler(logits, torch.zeros(3, 1, dtype=torch.long)), logits.argmax(-1))


@pytest.mark.parametrize(
    "bad",
    [
        {"temperature": -1.0},
        {"top_k": -2},
        {"top_p": 0.0},
        {"top_p": 1.5},
        {"repetition_penalty": 0},
    ],
)
def test_bad_params_are_rejected(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**bad)
