"""A preallocated key/value cache for one session over a span of blocks.

Allocating the whole cache up front keeps decode steps free of reallocation and lets a
server account for its memory budget exactly: `bytes_needed` is known before a session
is admitted.
"""

from __future__ import annotations

import torch
from volunteer.models.config import ModelConfig
from volunteer.models.errors import ContextLengthError


class KVCache:
    """Keys and values for `num_blocks` blocks, `batch` rows and up to `max_length` tokens.

    Attributes:
        keys: [num_blocks, B, kv_heads, T, D]
        values: [num_blocks, B, kv_heads, T, D]
        length: how many positions are filled (the next token's position).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.length = 0

    @classmethod
    def allocate(
        cls,
        config: ModelConfig,
        *,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> KVCache:
        """Allocates an empty cache (contents undefined until written)."""
        shape = (num_blocks, batch_size, config.num_kv_heads, max_length, config.head_dim)
        keys = torch.empty(shape, dtype=dtype, device=device)
        values = torch.empty(shape, dtype=dtype, device=device)
        return cls(keys, values)

    @staticmethod
    def bytes_needed(
        config: ModelConfig, *, num_blocks: int, batch_size: int, max_length: int, dtype_bytes: int
    ) -> int:
        """Memory `allocate` would take, for admission control before allocating."""
        per_token = 2 * config.num_kv_heads * config.head_dim * dtype_bytes
        return num_blocks * batch_size * max_length * per_token

    @property
    def max_length(self) -> int:
        return int(self.keys.shape[3])

    @property
    def batch_size(self) -> int:
        return int(self.keys.shape[1])

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Key and value buffers of one block, [B, kv_heads, T, D] each (views)."""
        return self.keys[index], self.values[index]

    def check_room(self, start_pos: int, new_tokens: int) -> None:
        """Raises ContextLengthError unless positions [start_pos, start_pos + new_tokens)
        fit, and start_pos leaves no unfilled gap before it."""
        if start_pos > self.length:
            raise ContextLengthError(
                f"position {start_pos} skips past the {self.length} cached positions"
            )
        if start_pos + new_tokens > self.max_length:
            raise ContextLengthError(
                f"KV cache full: {start_pos} + {new_tokens} tokens exceed "
                f"its {self.max_length} positions"
            )
