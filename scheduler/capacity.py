"""How many transformer blocks fit in the memory a volunteer lends.

A served block costs its weights, plus the attention cache it keeps for the cached
positions it promises (`cache_tokens`, summed over sessions), plus, when it also runs
backward passes for fine-tuning, the activations autograd keeps for one request. The
memory it may use is what the machine has free, capped by the volunteer's own limit,
minus a reserve for the process itself (the runtime, the model's ends, workspaces).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class BlockFootprint:
    """What one block costs in memory, for the dtype or quantisation it is served in."""

    weight_bytes: int
    cache_bytes_per_token: int
    """Keys and values of one block for one cached position."""
    activation_bytes_per_token: int = 0
    """What autograd keeps per position of a backward request (0: inference only)."""

    def __post_init__(self) -> None:
        if self.weight_bytes <= 0:
            raise ValueError(f"weight_bytes must be positive, got {self.weight_bytes}")
        if self.cache_bytes_per_token < 0 or self.activation_bytes_per_token < 0:
            raise ValueError("per-token bytes must not be negative")


@dataclasses.dataclass(frozen=True)
class MemoryBudget:
    """The memory a server may take on one device (RAM, or one GPU)."""

    available_bytes: int
    """Free on the device now."""
    limit_bytes: int | None = None
    """The most the volunteer allows (None: no limit of their own)."""
    reserve_bytes: int = 0
    """Kept back for the process: runtime, the model's ends, temporary buffers."""

    @property
    def usable_bytes(self) -> int:
        cap = self.available_bytes
        if self.limit_bytes is not None:
            cap = min(cap, self.limit_bytes)
        return max(cap - self.reserve_bytes, 0)


@dataclasses.dataclass(frozen=True)
class Capacity:
    """How many blocks fit, and why that many."""

    num_blocks: int
    bytes_per_block: int
    usable_bytes: int
    reason: str


def block_capacity(
    footprint: BlockFootprint,
    budget: MemoryBudget,
    *,
    cache_tokens: int,
    autograd_tokens: int = 0,
    total_blocks: int,
) -> Capacity:
    """The most blocks (at most the model's `total_blocks`) whose weights, cache and
    autograd reserve fit in `budget.usable_bytes`.

    Args:
        footprint: one block's costs.
        budget: the device's memory.
        cache_tokens: cached positions the server promises (batch * length, summed over
            sessions); each costs `cache_bytes_per_token` in every served block.
        autograd_tokens: positions of the largest backward request the server accepts.
        total_blocks: the model's number of blocks.

    Returns:
        The capacity; `num_blocks` may be 0, and `reason` then says what is short.
    """
    if cache_tokens < 0 or autograd_tokens < 0 or total_blocks < 1:
        raise ValueError("cache_tokens and autograd_tokens must be >= 0, total_blocks >= 1")
    per_block = (
        footprint.weight_bytes
        + cache_tokens * footprint.cache_bytes_per_token
        + autograd_tokens * footprint.activation_bytes_per_token
    )
    usable = budget.usable_bytes
    fit = usable // per_block
    count = min(fit, total_blocks)
    if count == total_blocks:
        reason = f"all {total_blocks} blocks fit in {_gib(usable)} ({_gib(per_block)} each)"
    elif count > 0:
        reason = (
            f"{count} of {total_blocks} blocks fit: {_gib(usable)} usable, {_gib(per_block)} "
            f"per block (weights {_gib(footprint.weight_bytes)} + cache for {cache_tokens} tokens"
            + (f" + autograd for {autograd_tokens} tokens" if autograd_tokens else "")
            + ")"
        )
    else:
        reason = (
            f"not one block fits: a block needs {_gib(per_block)} but only {_gib(usable)} "
            f"is usable (free {_gib(budget.available_bytes)}"
            + (f", limit {_gib(budget.limit_bytes)}" if budget.limit_bytes is not None else "")
            + f", reserve {_gib(budget.reserve_bytes)})"
        )
    return Capacity(num_blocks=count, bytes_per_block=per_block, usable_bytes=usable, reason=reason)


def _gib(count: int) -> str:
    return f"{count / 2**30:.2f} GiB"
