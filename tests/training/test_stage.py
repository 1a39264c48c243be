"""Stage peers (`volunteer.training.stage`): 2 stages x 3 peers, each microbatch routed
through a random peer of each stage, the stage's gradients aggregated each step, train a
tiny random model exactly as one process training it on the same batches does."""

from __future__ import annotations

import copy
import random

import pytest
import torch
import torch.nn.functional as F
from volunteer.models.model import BlockSpan, ModelEnds

from tests.server import random_span, sub_span, tiny_config
from volunteer.training.job import Aggregation, Optimizer
from volunteer.training.stage import MAX_IN_FLIGHT, StageError, StageTrainer, aggregate

STAGES = ((0, 2), (2, 4))
PEERS = 3
BATCH, MICRO, SEQ, STEPS = 12, 2, 8, 6
OPTIMIZER = Optimizer(name="adamw", lr=3e-3, weight_decay=0.01)
TOLERANCE = 1e-5
"""Relative, on the loss: float32 sums of one batch's gradient taken in other groupings."""


def _batches(vocab: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    return [torch.randint(0, vocab, (BATCH, SEQ + 1), generator=generator) for _ in range(STEPS)]


def _losses(ends: ModelEnds, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sequence's mean next-token loss."""
    logits = ends.logits(hidden)
    flat = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return flat.view(ids.shape[0], -1).mean(1)


def _alone(full: BlockSpan, ends: ModelEnds, batches: list[torch.Tensor]) -> list[float]:
    span = copy.deepcopy(full).train()
    optimizer = torch.optim.AdamW(span.parameters(), lr=OPTIMIZER.lr, weight_decay=0.01)
    losses = []
    for ids in batches:
        loss = _losses(ends, span(ends.embed(ids[:, :-1])), ids).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    return losses


def _swarm(
    full: BlockSpan, ends: ModelEnds, batches: list[torch.Tensor], aggregation: Aggregation
) -> tuple[list[float], list[list[StageTrainer]]]:
    stages = [
        [StageTrainer(sub_span(full, start, end), OPTIMIZER) for _ in range(PEERS)]
        for start, end in STAGES
    ]
    route = random.Random(5)
    losses = []
    for step, ids in enumerate(batches):
        total = 0.0
        for first in range(0, BATCH, MICRO):
            micro, key = ids[first : first + MICRO], f"{step}.{first}"
            peers = [route.choice(stage) for stage in stages]  # stochastic wiring
            hidden = ends.embed(micro[:, :-1]).detach()
            for peer in peers:
                hidden = peer.forward(key, hidden)
            last = hidden.requires_grad_(True)
            # The sum of the sequences' losses: the stages divide by what they saw.
            loss = _losses(ends, last, micro).sum()
            (grad,) = torch.autograd.grad(loss, [last])
            for peer in reversed(peers):
                grad = peer.backward(key, grad)
            total += float(loss.detach())
        for stage in stages:
            seen = [peer for peer in stage if peer.samples]
            agreed = aggregate(
                [peer.gradient() for peer in seen], [peer.samples for peer in seen], aggregation
            )
            for peer in stage:
                peer.step(agreed)
        losses.append(total / BATCH)
    return losses, stages


@pytest.fixture(scope="module")
def model() -> tuple[BlockSpan, ModelEnds, list[torch.Tensor]]:
    config = tiny_config()
    full = random_span(config)
    torch.manual_seed(1)
    ends = ModelEnds(config).eval().requires_grad_(False)
    return full, ends, _batches(config.vocab_size)


def test_two_stages_of_three_peers_train_as_one_process(model) -> None:  # type: ignore[no-untyped-def]
    full, ends, batches = model
    expected = _alone(full, ends, batches)
    losses, stages = _swarm(full, ends, batches, Aggregation(kind="mean"))
    assert losses == pytest.approx(expected, rel=TOLERANCE)
    assert expected[-1] < expected[0]  # (it did learn something to compare)
    for stage in stages:  # the peers of a stage kept the same weights, never sending them
        for peer in stage[1:]:
            for mine, theirs in zip(stage[0].params, peer.params, strict=True):
                assert torch.equal(mine, theirs)


def test_centered_clip_trains_within_five_percent_of_the_mean(model) -> None:  # type: ignore[no-untyped-def]
    full, ends, batches = model
    clean, _ = _swarm(full, ends, batches, Aggregation(kind="mean"))
    # A radius about the spread of the peers' gradients, so that clipping does bind.
    clipped, _ = _swarm(full, ends, batches, Aggregation(kind="centered-clip", tau=0.05))
    assert clipped[-1] == pytest.approx(clean[-1], rel=0.05)


def test_a_stage_refuses_what_does_not_fit() -> None:
    config = tiny_config()
    peer = StageTrainer(sub_span(random_span(config), 0, 2), OPTIMIZER)
    hidden = torch.randn(2, 3, config.hidden_size)
    with pytest.raises(StageError, match="no forward"):
        peer.backward("unknown", hidden)
    peer.forward("a", hidden)
    with pytest.raises(StageError, match="already in flight"):
        peer.forward("a", hidden)
    with pytest.raises(StageError, match="does not match"):
        peer.backward("a", torch.randn(2, 4, config.hidden_size))
    with pytest.raises(StageError, match="finite"):
        peer.forward("b", torch.full((1, 1, config.hidden_size), float("nan")))
    with pytest.raises(StageError, match="float"):
        peer.forward("c", torch.zeros(1, 1, config.hidden_size + 1))
    with pytest.raises(StageError, match="no microbatch came back"):
        peer.gradient()
    peer.backward("a", torch.randn(2, 3, config.hidden_size))
    with pytest.raises(StageError, match="finite numbers"):
        peer.step(torch.zeros(3))
    for index in range(MAX_IN_FLIGHT):
        peer.forward(f"m{index}", hidden[:1, :1])
    with pytest.raises(StageError, match="in flight here already"):
        peer.forward("one more", hidden[:1, :1])
