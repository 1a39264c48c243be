"""The daemon's span plan: the scheduler's decisions fed this machine's memory and limits."""

from __future__ import annotations

import pytest
from volunteer.models.weight_format import WeightFormat

from tests.server import tiny_config
from tests.swarm.test_records import make_info
from volunteer.daemon.span_plan import (
    MEMORY_FRACTION,
    MEMORY_RESERVE_BYTES,
    NotEnoughMemoryError,
    auto_cache_tokens,
    block_footprint,
    plan_capacity,
    plan_span,
)
from volunteer.errors import SettingsError
from volunteer.settings import Settings
from volunteer.swarm.records import SwarmSnapshot

CONFIG = tiny_config(num_layers=12)
PLENTY = 64 << 30


def _snapshot(spans: dict[str, tuple[int, int, float]]) -> SwarmSnapshot:
    entries = []
    for peer, (start, end, tps) in spans.items():
        info = make_info(start=start, end=end, throughput=tps, model="tiny")
        entries += [(index, peer, info) for index in range(start, end)]
    return SwarmSnapshot.build("tiny", CONFIG.num_layers, entries)


def _plan(settings: Settings, snapshot: SwarmSnapshot | None, available: int = PLENTY):
    return plan_span(
        CONFIG, settings, model_name="tiny", available_bytes=available, snapshot=snapshot
    )


def test_the_footprint_counts_weights_and_cache_per_token() -> None:
    footprint = block_footprint(CONFIG)
    # fp32: q, k, v, o (4 heads of 16 for q/o, 2 KV heads for k/v), 3 MLP matrices, 2 norms.
    params = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 160 + 2 * 64
    assert footprint.weight_bytes == params * 4
    assert footprint.cache_bytes_per_token == 2 * 2 * 16 * 4
    # Saved for backward: 2 norm inputs, q, k, v, attention output, 4 MLP tensors.
    assert footprint.activation_bytes_per_token == (2 * 64 + 64 + 2 * 32 + 64 + 4 * 160) * 4


def test_compressed_weights_count_at_their_compressed_size() -> None:
    """A q4 block is its 4-bit codes (rows padded to 16, inputs to the group of 32) and a
    bfloat16 step and offset per group; the norms stay float32: what capacity planning
    counts per block."""
    q4 = block_footprint(CONFIG, WeightFormat.parse("q4"))
    projections = [(128, 64), (64, 64), (320, 64), (64, 160)]  # [out, in] as held
    expected = sum(out * -(-k // 32) * 32 // 2 + out * -(-k // 32) * 4 for out, k in projections)
    assert q4.weight_bytes == expected + 2 * 64 * 4
    assert q4.weight_bytes < 0.25 * block_footprint(CONFIG).weight_bytes


def test_an_empty_swarm_is_joined_at_block_zero_with_all_that_fits() -> None:
    plan = _plan(Settings(), _snapshot({}))
    assert (plan.start, plan.end) == (0, 12)
    assert "no server holds any block yet" in plan.reason and "all 12 blocks fit" in plan.reason


def test_the_weakest_span_is_chosen_and_explained() -> None:
    snapshot = _snapshot({"a": (0, 6, 10.0), "b": (6, 12, 2.0)})
    plan = _plan(Settings(num_blocks=4), snapshot)
    assert (plan.start, plan.end) == (6, 10)
    assert "weakest span" in plan.reason and "as asked" in plan.reason


def test_a_memory_limit_shrinks_the_span_and_says_so() -> None:
    per_block = block_capacity_bytes()
    limit_gib = (MEMORY_RESERVE_BYTES + 3 * per_block + per_block // 2) / 2**30
    plan = _plan(Settings(max_ram_gib=limit_gib), _snapshot({}))
    assert plan.end - plan.start == 3
    assert "3 of 12 blocks fit" in plan.reason


def test_explicit_blocks_are_kept_and_checked_against_the_model() -> None:
    plan = _plan(Settings(blocks=(2, 5)), None)
    assert (plan.start, plan.end) == (2, 5)
    with pytest.raises(SettingsError, match="outside tiny, which has 12 blocks"):
        _plan(Settings(blocks=(10, 14)), None)


def test_no_room_for_one_block_is_a_clear_error() -> None:
    with pytest.raises(NotEnoughMemoryError, match="not one block fits"):
        plan_capacity(CONFIG, Settings(), available_bytes=MEMORY_RESERVE_BYTES)


def test_the_auto_cache_stays_within_the_limit_and_holds_one_full_session() -> None:
    roomy = auto_cache_tokens(CONFIG, Settings(), 12, PLENTY)
    tight = auto_cache_tokens(CONFIG, Settings(max_ram_gib=0.6), 12, PLENTY)
    none_left = auto_cache_tokens(CONFIG, Settings(max_ram_gib=0.5), 12, PLENTY)
    assert roomy > tight > none_left == CONFIG.max_position_embeddings
    footprint = block_footprint(CONFIG)
    reserve = Settings().max_backward_tokens * footprint.activation_bytes_per_token
    budget = 0.6 * 2**30 - MEMORY_RESERVE_BYTES - 12 * (footprint.weight_bytes + reserve)
    assert tight * 12 * footprint.cache_bytes_per_token <= budget


def block_capacity_bytes() -> int:
    """Bytes one block takes in the plan: weights, one full-context session's cache and
    one backward request's activations."""
    footprint = block_footprint(CONFIG)
    return (
        footprint.weight_bytes
        + CONFIG.max_position_embeddings * footprint.cache_bytes_per_token
        + Settings().max_backward_tokens * footprint.activation_bytes_per_token
    )


def test_the_autograd_reserve_is_the_backward_cap() -> None:
    free = int((MEMORY_RESERVE_BYTES + 5 * block_capacity_bytes()) / MEMORY_FRACTION) + 1
    assert plan_capacity(CONFIG, Settings(), free).num_blocks == 5
    assert plan_capacity(CONFIG, Settings(max_backward_tokens=1024), free).num_blocks < 5


def test_the_memory_fraction_applies_to_what_is_free() -> None:
    free = int((MEMORY_RESERVE_BYTES + 5 * block_capacity_bytes()) / MEMORY_FRACTION) + 1
    assert plan_capacity(CONFIG, Settings(), free).num_blocks == 5
