"""A batched step of several sessions equals the same steps run one by one."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from volunteer.models.batched_step import StepPart, span_step_batch
from volunteer.models.model import BlockSpan

from tests.server import random_span, tiny_config

TOLERANCE = 1e-5
"""float32: a batched matmul sums each row in the same order as a single row's on
every BLAS we know, but not by contract; 1e-5 of the output's scale leaves room for a
blocked kernel and still fails on any mixed-up row, position or cache (those move
outputs by 1e-1 and more)."""


def _prefill(span: BlockSpan, length: int, seed: int, batch: int = 1):
    generator = torch.Generator().manual_seed(seed)
    cache = span.allocate_cache(batch_size=batch, max_length=96)
    hidden = torch.randn(batch, length, span.config.hidden_size, generator=generator)
    with torch.inference_mode():
        span(hidden, start_pos=0, cache=cache)
    cache.length = length
    return cache


def _twin(span: BlockSpan, cache):
    """A copy of the cache, for the one-by-one reference."""
    copy = span.allocate_cache(batch_size=cache.batch_size, max_length=cache.max_length)
    for index in range(span.num_blocks):
        for mine, theirs in zip(copy.layer(index), cache.layer(index), strict=True):
            mine.copy_(theirs)
    copy.length = cache.length
    return copy


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return bool((a - b).abs().max() <= TOLERANCE * b.abs().max())


@pytest.mark.parametrize("window", [None, 8])
def test_a_batched_step_equals_each_session_alone(window: int | None) -> None:
    config = dataclasses.replace(tiny_config(), sliding_window=window)
    span = random_span(config)
    hidden_size = config.hidden_size
    generator = torch.Generator().manual_seed(7)
    # (positions cached before, start_pos of the step, new positions, batch)
    shapes = [
        (5, 5, 1, 1),  # a decode step
        (40, 40, 1, 1),  # a decode step at a later position
        (12, 7, 1, 1),  # a step that rewinds to position 7
        (20, 20, 6, 1),  # a chunk of a prefill after earlier chunks
        (0, 0, 9, 1),  # a first chunk
        (9, 9, 1, 3),  # a session of three rows
    ]
    caches, parts, twins = [], [], []
    for seed, (cached, start_pos, new, batch) in enumerate(shapes):
        cache = (
            _prefill(span, cached, seed, batch)
            if cached
            else span.allocate_cache(batch_size=batch, max_length=96)
        )
        caches.append(cache)
        twins.append(_twin(span, cache))
        hidden = torch.randn(batch, new, hidden_size, generator=generator)
        parts.append(StepPart(hidden, start_pos, cache))
    with torch.inference_mode():
        batched = span_step_batch(span, parts)
        alone = [
            span(part.hidden, start_pos=part.start_pos, cache=twin)
            for part, twin in zip(parts, twins, strict=True)
        ]
    for index, (mine, reference) in enumerate(zip(batched, alone, strict=True)):
        assert mine.shape == reference.shape
        assert _close(mine, reference), f"part {index} differs"
    # The caches hold what the one-by-one steps wrote, up to each step's end.
    for part, cache, twin in zip(parts, caches, twins, strict=True):
        end = part.start_pos + part.hidden.shape[1]
        for index in range(span.num_blocks):
            for mine, theirs in zip(cache.layer(index), twin.layer(index), strict=True):
                assert _close(mine[:, :, :end], theirs[:, :, :end])


def test_a_sub_range_of_blocks_runs_on_its_own_cache() -> None:
    span = random_span(tiny_config())
    generator = torch.Generator().manual_seed(1)
    parts, twins = [], []
    for seed in range(3):
        cache = span.allocate_cache(batch_size=1, max_length=32)
        # A cache for blocks 1:3 of the span: allocated like the span's, two layers used.
        twins.append(_twin(span, cache))
        hidden = torch.randn(1, 2 + seed, span.config.hidden_size, generator=generator)
        parts.append(StepPart(hidden, 0, cache))
    with torch.inference_mode():
        batched = span_step_batch(span, parts, first=1, last=3)
        alone = [
            span(p.hidden, cache=t, first=1, last=3) for p, t in zip(parts, twins, strict=True)
        ]
    assert all(_close(a, b) for a, b in zip(batched, alone, strict=True))


def test_batching_changes_nothing_that_a_mixed_up_row_would_not() -> None:
    """The check above can fail: swapping two sessions' caches is caught."""
    span = random_span(tiny_config())
    first, second = _prefill(span, 10, 0), _prefill(span, 10, 1)
    twin = _twin(span, first)
    hidden = torch.randn(1, 1, span.config.hidden_size)
    with torch.inference_mode():
        (wrong,) = span_step_batch(span, [StepPart(hidden, 10, second)])
        right = span(hidden, start_pos=10, cache=twin)
    assert not _close(wrong, right)
