"""Long forward and backward calls computed in slices: each slice a job of its own on the
compute thread, so that others' jobs run between them, with the outputs of the whole
call within float tolerance of computing it at once."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

import pytest
import torch
from volunteer.models.adapters import LORA_TARGETS, AdapterLayout, SpanAdapter
from volunteer.models.config import ModelConfig

from tests.server import (
    WAIT_S,
    hidden_states,
    random_span,
    sub_span,
    tiny_config,
    whole_backward,
    whole_forward,
)
from volunteer.server.compute import (
    PRIORITY_TRAINING,
    PriorityCompute,
)
from volunteer.server.slices import (
    BACKWARD_COST,
    SliceBudget,
    backward_groups,
    forward_plan,
    sliced_backward,
    sliced_forward,
)

ATOL = 1e-5


@pytest.mark.parametrize(
    ("batch", "seq", "units"),
    [(1, 8, 1000), (1, 8, 16), (2, 8, 16), (1, 8, 3), (3, 5, 1), (2, 7, 4)],
)
def test_a_forward_plan_covers_the_call_in_slices_within_the_budget(
    batch: int, seq: int, units: int
) -> None:
    plan = forward_plan(batch, seq, 1, 4, units)
    covered = {
        (b, p)
        for piece in plan
        for b in range(piece.start, piece.end)
        for p in range(piece.first, piece.last)
    }
    assert covered == {(b, p) for b in range(1, 4) for p in range(seq)}
    assert sum((s.end - s.start) * (s.last - s.first) for s in plan) == 3 * seq  # no overlap
    for piece in plan:
        # At most the budget, unless one block over one position is already more.
        size = batch * (piece.last - piece.first) * (piece.end - piece.start)
        assert size <= max(units, batch)
        # A run of positions is of one block: its cache holds that block only.
        assert (piece.first, piece.last) == (0, seq) or piece.end - piece.start == 1
    # Within a block, runs come in order of position (each attends to the ones before).
    assert plan == sorted(plan, key=lambda s: (s.start, s.first))


def test_a_backward_is_cut_into_groups_of_whole_blocks() -> None:
    assert [(g.start, g.end) for g in backward_groups(1, 4, 0, 4, 1)] == [
        (0, 1),
        (1, 2),
        (2, 3),
        (3, 4),
    ]
    assert [(g.start, g.end) for g in backward_groups(1, 4, 0, 4, 2 * BACKWARD_COST * 4)] == [
        (0, 2),
        (2, 4),
    ]
    assert [(g.start, g.end) for g in backward_groups(2, 4, 1, 3, 10**6)] == [(1, 3)]


Result = TypeVar("Result")


def _run(scenario: Callable[[PriorityCompute], Awaitable[Result]]) -> Result:
    """`scenario` on a fresh compute thread, within WAIT_S."""

    async def main() -> Result:
        compute = PriorityCompute()
        try:
            return await asyncio.wait_for(scenario(compute), WAIT_S)
        finally:
            compute.shutdown()

    return asyncio.run(main())


SPANS = {
    "llama": tiny_config(num_layers=4),
    # A window shorter than the call: the runs of positions must mask the same keys.
    "sliding window": dataclasses.replace(tiny_config(num_layers=4), sliding_window=3),
}


@pytest.mark.parametrize("config", SPANS.values(), ids=SPANS.keys())
@pytest.mark.parametrize("target_s", [0.0, 1e-9, 10.0])
@pytest.mark.parametrize(("start", "end"), [(0, 4), (1, 3)])
def test_a_sliced_forward_matches_the_whole_forward(
    config: ModelConfig, target_s: float, start: int, end: int
) -> None:
    span = random_span(config)
    hidden = hidden_states(2, 7, seed=3)
    budget = SliceBudget(target_s)
    sliced = _run(
        lambda compute: sliced_forward(compute, span, hidden, start, end, peer="p", budget=budget)
    )
    assert sliced.dtype == hidden.dtype and sliced.shape == hidden.shape
    torch.testing.assert_close(sliced, whole_forward(span, hidden, start, end), atol=ATOL, rtol=0)


def test_the_smallest_slices_are_one_block_over_one_position() -> None:
    span = random_span(tiny_config(num_layers=2))
    hidden = hidden_states(1, 5, seed=4)

    async def count_jobs(compute: PriorityCompute) -> int:
        await sliced_forward(compute, span, hidden, 0, 2, peer="p", budget=SliceBudget(0.0))
        return compute.jobs_run

    assert _run(count_jobs) == 2 * 5


@pytest.mark.parametrize("target_s", [0.0, 10.0])
def test_a_sliced_backward_matches_the_whole_backward(target_s: float) -> None:
    span = random_span(tiny_config(num_layers=4))
    hidden, grad_outputs = hidden_states(1, 6, seed=5), hidden_states(1, 6, seed=6)
    budget = SliceBudget(target_s)
    sliced, adapter_grads = _run(
        lambda compute: sliced_backward(
            compute, span, hidden, grad_outputs, 1, 4, peer="p", budget=budget
        )
    )
    whole = whole_backward(span, hidden, grad_outputs, 1, 4)
    torch.testing.assert_close(sliced, whole, atol=ATOL, rtol=1e-4)
    assert adapter_grads == ()


ADAPTERS = {
    "deep prompts": AdapterLayout(prompt_len=2),
    "lora": AdapterLayout(rank=3, targets=LORA_TARGETS, scale=2.0),
    "both, two targets": AdapterLayout(prompt_len=3, rank=2, targets=("o", "down")),
}


@pytest.mark.parametrize("layout", ADAPTERS.values(), ids=ADAPTERS.keys())
@pytest.mark.parametrize("target_s", [0.0, 10.0])
def test_an_adapted_call_matches_autograd_through_the_whole_adapted_span(
    layout: AdapterLayout, target_s: float
) -> None:
    config = tiny_config(num_layers=4)
    span = random_span(config)
    hidden, grad_outputs = hidden_states(2, 6, seed=5), hidden_states(2, 6, seed=6)
    generator = torch.Generator().manual_seed(7)
    tensors = [torch.randn(shape, generator=generator) * 0.1 for shape in layout.shapes(config, 3)]
    adapter = SpanAdapter.of(layout, tensors, config)
    budget = SliceBudget(target_s)  # 0: one job per block, each applying its part
    output = _run(
        lambda compute: sliced_forward(
            compute, span, hidden, 1, 4, peer="p", budget=budget, adapter=adapter
        )
    )
    grad, adapter_grads = _run(
        lambda compute: sliced_backward(
            compute, span, hidden, grad_outputs, 1, 4, peer="p", budget=budget, adapter=adapter
        )
    )
    leaves = [t.detach().requires_grad_(True) for t in tensors]
    inputs = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        expected = span(inputs, first=1, last=4, adapter=SpanAdapter(layout, tuple(leaves)))
        expected_grads = torch.autograd.grad(expected, [inputs, *leaves], grad_outputs)
    torch.testing.assert_close(output, expected.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(grad, expected_grads[0], atol=ATOL, rtol=1e-4)
    assert len(adapter_grads) == len(tensors)
    for actual, reference in zip(adapter_grads, expected_grads[1:], strict=True):
        torch.testing.assert_close(actual, reference, atol=ATOL, rtol=1e-4)
    # The adapter changes the output: a server that ignored it would not pass.
    assert not torch.allclose(output, whole_forward(span, hidden, 1, 4), atol=1e-3)


def test_another_peers_job_waits_for_one_slice_not_the_whole_call() -> None:
    """A long forward holds the compute thread one slice at a time: a job queued while
    it runs goes next, after the slice in progress."""
    span = random_span(tiny_config(num_layers=4))
    hidden = hidden_states(1, 8, seed=7)
    gate = threading.Event()

    async def scenario(compute: PriorityCompute) -> tuple[int, int]:
        held = asyncio.ensure_future(compute.run(PRIORITY_TRAINING, gate.wait, WAIT_S, peer="x"))
        while compute.queued:  # until the thread runs it
            await asyncio.sleep(0.01)
        forward = asyncio.ensure_future(
            sliced_forward(compute, span, hidden, 0, 4, peer="long", budget=SliceBudget(0.0))
        )
        while compute.queued < 1:  # the forward's first slice is queued
            await asyncio.sleep(0.01)
        other = asyncio.ensure_future(
            compute.run(PRIORITY_TRAINING, lambda: compute.jobs_run, peer="short")
        )
        while compute.queued < 2:
            await asyncio.sleep(0.01)
        gate.set()
        await asyncio.gather(held, forward)
        return await other, compute.jobs_run

    seen_by_other, total = _run(scenario)
    # The hold and the forward's first slice ran before it (queued first, a tie of
    # attained service); then the forward had used the thread, and the other peer not.
    assert seen_by_other == 2
    assert total == 1 + 4 * 8 + 1


def test_a_budget_follows_the_measured_time_per_position() -> None:
    budget = SliceBudget(0.01)
    assert budget.units() > 0  # before any measure: a fixed guess
    assert budget.units(decode_s=0.002, blocks=4) == 20  # a decode step: 1 position, 4 blocks
    budget.record(100, 0.1)
    assert budget.units() == 10
    assert SliceBudget(0.0).units(decode_s=1.0) == 1


def test_a_bfloat16_span_takes_float32_and_answers_in_float32() -> None:
    span = sub_span(random_span(tiny_config()), 0, 2).to(torch.bfloat16)
    hidden = hidden_states(1, 4)
    budget = SliceBudget(10.0)  # one job: the whole call, as the reference runs it
    actual = _run(
        lambda compute: sliced_forward(compute, span, hidden, 0, 2, peer="p", budget=budget)
    )
    with torch.no_grad():
        expected = span(hidden.to(torch.bfloat16)).float()
    assert actual.dtype == torch.float32
    assert torch.equal(actual, expected)
    grad, _ = _run(
        lambda compute: sliced_backward(
            compute, span, hidden, torch.ones_like(hidden), 0, 2, peer="p", budget=budget
        )
    )
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0
