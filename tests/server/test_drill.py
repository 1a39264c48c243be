"""A drill server's wrong outputs: each fault makes the output wrong the way it says, on
the share of steps it says, and an honest server's output goes through untouched."""

from __future__ import annotations

import asyncio
import random

import torch

from tests.server import hidden_states, random_span, tiny_config, whole_forward
from volunteer.faults import parse_faults
from volunteer.server.compute import PriorityCompute
from volunteer.server.drill import Drill, misbehave
from volunteer.server.handler import BlockHandler
from volunteer.server.sessions import SessionTable
from volunteer.server.validation import ServerLimits


def _relative_errors(wrong: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    return (wrong - right).norm(dim=-1) / right.norm(dim=-1)


def test_perturb_adds_noise_of_scale_times_each_positions_norm() -> None:
    output = hidden_states(2, 5)
    wrong = misbehave(parse_faults("perturb:1.0:0.05"), output, None, random.Random(0))
    torch.testing.assert_close(
        _relative_errors(wrong, output), torch.full((2, 5), 0.05), rtol=1e-4, atol=1e-6
    )


def test_perturb_strikes_its_share_of_steps() -> None:
    faults, rng = parse_faults("perturb:0.3:0.05"), random.Random(1)
    output = hidden_states(1, 1)
    struck = sum(not torch.equal(misbehave(faults, output, None, rng), output) for _ in range(2000))
    assert 500 < struck < 700  # 600 expected


def test_constant_answers_zeros_and_stale_the_previous_output() -> None:
    rng = random.Random(2)
    output, previous = hidden_states(1, 3, seed=1), hidden_states(1, 2, seed=2)
    assert not misbehave(parse_faults("constant"), output, previous, rng).any()
    stale = misbehave(parse_faults("stale"), output, previous, rng)
    assert torch.equal(stale, previous[:, -1:].expand_as(output))
    assert not misbehave(parse_faults("stale"), output, None, rng).any()


def test_without_output_faults_the_output_goes_through_untouched() -> None:
    output = hidden_states(1, 4)
    for text in ("", "lie-accuse", "perturb:0:0.05"):
        assert misbehave(parse_faults(text), output, None, random.Random(3)) is output


def test_a_drill_keeps_each_sessions_previous_output() -> None:
    drill = Drill(parse_faults("stale"), seed=4)
    first, second = hidden_states(1, 1, seed=1), hidden_states(1, 1, seed=2)
    assert not drill.output("a", first).any()  # nothing before the first step
    assert not drill.output("b", second).any()
    assert torch.equal(drill.output("a", second), first)  # a's own previous, not b's


def test_a_drill_handler_answers_forward_calls_wrong_and_an_honest_one_right() -> None:
    config = tiny_config(num_layers=2)
    span = random_span(config)
    hidden = hidden_states(1, 3)
    right = whole_forward(span, hidden, 0, 2)

    async def forward(drill: Drill | None) -> torch.Tensor:
        handler = BlockHandler(
            span=span,
            model_name="tiny",
            limits=ServerLimits(
                max_batch=1, max_chunk=8, max_tokens=8, max_length=64, idle_timeout_s=10
            ),
            sessions=SessionTable(cache_tokens=64),
            compute=PriorityCompute(),
            throughput=0.0,
        )
        handler.drill = drill
        try:
            return await handler.run_forward(hidden, 0, 2)
        finally:
            handler.compute.shutdown()

    torch.testing.assert_close(asyncio.run(forward(None)), right)
    wrong = asyncio.run(forward(Drill(parse_faults("perturb:1.0:0.05"), seed=5)))
    torch.testing.assert_close(
        _relative_errors(wrong, right), torch.full((1, 3), 0.05), rtol=1e-3, atol=1e-5
    )
