"""Which blocks this daemon serves, and how much attention cache it offers, with reasons.

The decisions are the scheduler's (`volunteer.scheduler.capacity`,
`volunteer.scheduler.block_selection`); this module feeds them this machine's memory, the
volunteer's limits and the model's sizes, and words the outcome for logs, `volunteer status`
and `volunteer profile`.
"""

from __future__ import annotations

import dataclasses

import torch

from volunteer.errors import SettingsError, VolunteerError
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan
from volunteer.models.weight_format import WeightFormat
from volunteer.scheduler.capacity import BlockFootprint, Capacity, MemoryBudget, block_capacity
from volunteer.settings import Settings
from volunteer.swarm.records import SwarmSnapshot

FP32 = WeightFormat("fp32")
MEMORY_FRACTION = 0.8
"""Share of the memory available at start that the blocks and caches may take."""
MEMORY_RESERVE_BYTES = 512 << 20
"""Left for the process itself, the model's ends and activations."""
CACHE_MEMORY_FRACTION = 0.25
"""Share of the memory left after loading that the attention caches may take."""
MAX_AUTO_CACHE_BYTES = 4 << 30
GIB = 2**30


class NotEnoughMemoryError(VolunteerError):
    """Not even one block fits in the memory this machine has free (or was allowed)."""


@dataclasses.dataclass(frozen=True)
class SpanPlan:
    start: int
    end: int
    reason: str
    """Why these blocks, in plain words."""
    capacity: Capacity


def block_footprint(config: ModelConfig, fmt: WeightFormat = FP32) -> BlockFootprint:
    """One block's weights (held in `fmt`), its cache per position, and what autograd
    keeps per position of a backward request."""
    with torch.device("meta"):
        block = BlockSpan(config, 0, 1)
    weights = fmt.block_bytes(block.blocks[0])
    dtype = fmt.activation_dtype
    kv_hidden = config.num_kv_heads * config.head_dim
    per_token = 2 * kv_hidden * dtype.itemsize
    # Saved for backward, per position: the inputs of both norms, q, k and v, the
    # attention output, and the MLP's gate, up, activation and down input.
    q_hidden = config.num_heads * config.head_dim
    saved = 2 * config.hidden_size + q_hidden + 2 * kv_hidden + q_hidden
    saved += 4 * config.intermediate_size
    return BlockFootprint(
        weight_bytes=weights,
        cache_bytes_per_token=per_token,
        activation_bytes_per_token=saved * dtype.itemsize,
    )


def memory_budget(settings: Settings, available_bytes: int) -> MemoryBudget:
    limit = None if settings.max_ram_gib is None else int(settings.max_ram_gib * GIB)
    return MemoryBudget(
        available_bytes=int(available_bytes * MEMORY_FRACTION),
        limit_bytes=limit,
        reserve_bytes=MEMORY_RESERVE_BYTES,
    )


def plan_capacity(
    config: ModelConfig, settings: Settings, available_bytes: int, fmt: WeightFormat = FP32
) -> Capacity:
    """How many blocks fit (their weights held in `fmt`), each with room for one
    full-context session (or the cache tokens the volunteer set) and one backward
    request's activations.

    Raises:
        NotEnoughMemoryError: not one block fits.
    """
    capacity = _capacity(config, settings, available_bytes, fmt)
    if capacity.num_blocks == 0:
        raise NotEnoughMemoryError(capacity.reason)
    return capacity


def _capacity(
    config: ModelConfig, settings: Settings, available_bytes: int, fmt: WeightFormat
) -> Capacity:
    return block_capacity(
        block_footprint(config, fmt),
        memory_budget(settings, available_bytes),
        cache_tokens=settings.cache_tokens or config.max_position_embeddings,
        # The server refuses longer backward calls and runs one at a time: the cap and
        # this reserve are the same setting (servers answer fine-tuning clients too).
        autograd_tokens=settings.max_backward_tokens,
        total_blocks=config.num_layers,
    )


def plan_span(
    config: ModelConfig,
    settings: Settings,
    *,
    model_name: str,
    available_bytes: int,
    snapshot: SwarmSnapshot | None,
    fmt: WeightFormat = FP32,
) -> SpanPlan:
    """The blocks to serve: `--blocks` as given, else as many as asked for (`--num-blocks`)
    and fit, where the swarm (`snapshot`, needed then) is weakest. Ties go to the lowest
    start (as in Petals): servers that join at the same moment may then pile up on one
    span, which rebalancing undoes; random tie-breaks would instead scatter them into
    misaligned spans with holes between them.

    Raises:
        SettingsError: `--blocks` reaches past the model.
        NotEnoughMemoryError: not one block fits (when the scheduler chooses).
    """
    total = config.num_layers
    if settings.blocks is not None:
        start, end = settings.blocks
        if end > total:
            raise SettingsError(
                f"--blocks {start}:{end} is outside {model_name}, which has {total} blocks "
                f"(0:{total})"
            )
        capacity = _capacity(config, settings, available_bytes, fmt)
        reason = f"blocks {start}:{end} as set (--blocks)"
        if end - start > capacity.num_blocks:
            reason += f"; more than the scheduler would take here: {capacity.reason}"
        return SpanPlan(start, end, reason, capacity)
    if snapshot is None:
        raise ValueError("choosing blocks needs the swarm's snapshot")
    capacity = plan_capacity(config, settings, available_bytes, fmt)
    wanted = settings.num_blocks or total
    count = min(wanted, capacity.num_blocks)
    start, end = snapshot.weakest_span(count)
    per_block = snapshot.block_throughput()
    weakest = min(per_block[start:end])
    size = (
        f"{count} blocks ({capacity.reason})"
        if count < wanted
        else f"{count} blocks (as asked)"
        if settings.num_blocks
        else f"{count} blocks: {capacity.reason}"
    )
    where = (
        "no server holds any block yet"
        if max(per_block) == 0
        else f"they are the swarm's weakest span (its weakest block there: {weakest:.3g} tokens/s)"
    )
    return SpanPlan(start, end, f"blocks {start}:{end} because {where}; {size}", capacity)


def auto_cache_tokens(
    config: ModelConfig,
    settings: Settings,
    num_blocks: int,
    available_bytes: int,
    fmt: WeightFormat = FP32,
) -> int:
    """The cache budget when the volunteer set none: a share of the memory the blocks
    (held in `fmt`) leave (within the limit), capped, and at least one full-context
    session."""
    footprint = block_footprint(config, fmt)
    left = memory_budget(settings, available_bytes).usable_bytes
    left -= num_blocks * (
        footprint.weight_bytes + settings.max_backward_tokens * footprint.activation_bytes_per_token
    )
    budget = min(max(left, 0), available_bytes * CACHE_MEMORY_FRACTION, MAX_AUTO_CACHE_BYTES)
    per_token = num_blocks * footprint.cache_bytes_per_token
    return max(int(budget // per_token), config.max_position_embeddings)
