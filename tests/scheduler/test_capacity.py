"""How many blocks fit: never more than the memory allows, all of them when it allows."""

from __future__ import annotations

import random

import pytest
from volunteer.scheduler.capacity import BlockFootprint, MemoryBudget, block_capacity

GIB = 2**30
BLOCK = BlockFootprint(
    weight_bytes=100 << 20, cache_bytes_per_token=4096, activation_bytes_per_token=8192
)


def test_capacity_never_exceeds_the_usable_memory_on_random_inputs() -> None:
    rng = random.Random(7)
    for _ in range(2000):
        footprint = BlockFootprint(
            weight_bytes=rng.randint(1, 4 * GIB),
            cache_bytes_per_token=rng.randint(0, 1 << 16),
            activation_bytes_per_token=rng.randint(0, 1 << 16),
        )
        budget = MemoryBudget(
            available_bytes=rng.randint(0, 200 * GIB),
            limit_bytes=rng.choice([None, rng.randint(0, 100 * GIB)]),
            reserve_bytes=rng.randint(0, 2 * GIB),
        )
        total = rng.randint(1, 100)
        cache_tokens, autograd_tokens = rng.randint(0, 100_000), rng.randint(0, 4096)
        capacity = block_capacity(
            footprint, budget, cache_tokens=cache_tokens, autograd_tokens=autograd_tokens,
            total_blocks=total,
        )  # fmt: skip
        used = capacity.num_blocks * capacity.bytes_per_block
        assert 0 <= capacity.num_blocks <= total
        assert used <= budget.usable_bytes
        if capacity.num_blocks < total:  # one more would not fit
            assert used + capacity.bytes_per_block > budget.usable_bytes


def test_the_cache_and_autograd_reserve_count_per_block() -> None:
    budget = MemoryBudget(available_bytes=10 * GIB, reserve_bytes=GIB)
    plain = block_capacity(BLOCK, budget, cache_tokens=0, total_blocks=1000)
    cached = block_capacity(BLOCK, budget, cache_tokens=8192, total_blocks=1000)
    training = block_capacity(
        BLOCK, budget, cache_tokens=8192, autograd_tokens=2048, total_blocks=1000
    )
    assert plain.num_blocks == (9 * GIB) // (100 << 20)
    assert cached.bytes_per_block == (100 << 20) + 8192 * 4096
    assert training.bytes_per_block == cached.bytes_per_block + 2048 * 8192
    assert plain.num_blocks > cached.num_blocks > training.num_blocks > 0


def test_the_volunteers_limit_caps_what_is_free() -> None:
    free = MemoryBudget(available_bytes=64 * GIB)
    capped = MemoryBudget(available_bytes=64 * GIB, limit_bytes=GIB)
    assert block_capacity(BLOCK, free, cache_tokens=0, total_blocks=30).num_blocks == 30
    limited = block_capacity(BLOCK, capped, cache_tokens=0, total_blocks=30)
    assert limited.num_blocks == GIB // (100 << 20)
    assert "of 30 blocks fit" in limited.reason


def test_nothing_fits_says_what_is_short() -> None:
    budget = MemoryBudget(available_bytes=GIB, reserve_bytes=GIB - (10 << 20))
    capacity = block_capacity(BLOCK, budget, cache_tokens=0, total_blocks=30)
    assert capacity.num_blocks == 0
    assert "not one block fits" in capacity.reason and "reserve" in capacity.reason


def test_bad_footprints_and_arguments_are_refused() -> None:
    with pytest.raises(ValueError):
        BlockFootprint(weight_bytes=0, cache_bytes_per_token=1)
    with pytest.raises(ValueError):
        block_capacity(BLOCK, MemoryBudget(available_bytes=GIB), cache_tokens=-1, total_blocks=3)
