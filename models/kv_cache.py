"""A preallocated key/value cache for one session over a span of blocks.

Allocating the whole cache up front keeps decode steps free of reallocation and lets a
server account for its memory budget exactly: `bytes_needed` is known before a session
is admitted, and `nbytes` is what a cache holds.

Two formats (`KVFormat`): "float" keeps keys and values in the model's dtype, and each
block's cache is a plain (keys, values) pair of tensors that attention writes and reads
directly; "q4" keeps them in FlexGen's group-wise 4 bits (`Q4KVCache`: 5/32 of the
bytes of float32, 5/16 of 16 bits, for head_dim 64 in groups of 32), and each block's
cache is a `Q4LayerCache` that quantizes on write and dequantizes on read
(`volunteer.models.kv_quant`), trading accuracy and decode time for room.
"""

from __future__ import annotations

from typing import Literal, TypeAlias

import torch
from volunteer.models.config import ModelConfig
from volunteer.models.errors import ContextLengthError
from volunteer.models.kv_quant import CompressedLayerCache, Q4LayerCache, Q4Layout

KVFormat = Literal["float", "q4"]
KV_FORMATS: tuple[KVFormat, ...] = ("float", "q4")

LayerCache: TypeAlias = tuple[torch.Tensor, torch.Tensor] | CompressedLayerCache
"""One block's cache as attention takes it: float buffers [B, kv_heads, T, D] to write
and read in place, or a compressed cache with `write` and `read`."""


class KVCache:
    """Keys and values for `num_blocks` blocks, `batch` rows and up to `max_length` tokens.

    Attributes:
        keys: [num_blocks, B, kv_heads, T, D] (a `Q4KVCache` holds packed rows instead
            of D values).
        values: as keys.
        length: how many positions are filled (the next token's position).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys
        self.values = values
        self.length = 0
        # Made once: every block of every step asks for its views.
        self._layers = list(zip(keys.unbind(0), values.unbind(0), strict=True))

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
        kv_format: KVFormat = "float",
        group_size: int | None = None,
    ) -> KVCache:
        """Allocates an empty cache (contents undefined until written).

        Args:
            dtype: what attention computes in: the float format's storage, and what
                the q4 format reads back.
            kv_format: "float" or "q4" (a `Q4KVCache`).
            group_size: values per 4-bit group along head_dim (q4 only; default
                `kv_quant.default_group_size`).

        Raises:
            ValueError: an unknown format.
            QuantError: a head_dim or group size the q4 format cannot pack.
        """
        lead = (num_blocks, batch_size, config.num_kv_heads, max_length)
        if kv_format == "float":
            keys = torch.empty((*lead, config.head_dim), dtype=dtype, device=device)
            return KVCache(keys, torch.empty_like(keys))
        if kv_format == "q4":
            layout = Q4Layout.of(config.head_dim, dtype, group_size)
            keys = torch.empty((*lead, layout.row_bytes), dtype=torch.uint8, device=device)
            return Q4KVCache(keys, torch.empty_like(keys), layout)
        raise ValueError(f"KV cache format {kv_format!r} is not one of {', '.join(KV_FORMATS)}")

    @staticmethod
    def bytes_needed(
        config: ModelConfig,
        *,
        num_blocks: int,
        batch_size: int,
        max_length: int,
        dtype_bytes: int,
        kv_format: KVFormat = "float",
        group_size: int | None = None,
    ) -> int:
        """Memory `allocate` would take (its `nbytes`), for admission control before
        allocating. (`dtype_bytes` is the float format's; q4 rows do not depend on it.)"""
        row_bytes = config.head_dim * dtype_bytes
        if kv_format == "q4":
            row_bytes = Q4Layout.of(config.head_dim, torch.uint8, group_size).row_bytes
        return 2 * num_blocks * batch_size * config.num_kv_heads * max_length * row_bytes

    @property
    def max_length(self) -> int:
        return int(self.keys.shape[3])

    @property
    def batch_size(self) -> int:
        return int(self.keys.shape[1])

    @property
    def nbytes(self) -> int:
        """Bytes the cache holds (keys and values, every block)."""
        return self.keys.nbytes + self.values.nbytes

    @property
    def workspace_bytes(self) -> int:
        """Further bytes a step may allocate for the cache while it runs (none here)."""
        return 0

    def layer(self, index: int) -> LayerCache:
        """Key and value buffers of one block, [B, kv_heads, T, D] each (views)."""
        return self._layers[index]

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


class Q4KVCache(KVCache):
    """A `KVCache` in FlexGen's group-wise 4 bits: `keys` and `values` hold uint8 rows
    [num_blocks, B, kv_heads, T, row_bytes] laid out as `layout` says
    (`volunteer.models.kv_quant`). Make one with `KVCache.allocate(kv_format="q4")`."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, layout: Q4Layout) -> None:
        super().__init__(keys, values)
        self.layout = layout

    @property
    def workspace_bytes(self) -> int:
        """What one block's read at full length allocates: its keys and values in the
        model's dtype, and the packed and unpacked codes on the way (freed after the
        block's attention)."""
        rows = self.batch_size * int(self.keys.shape[2]) * self.max_length
        return self.layout.read_workspace_bytes(rows)

    def layer(self, index: int) -> Q4LayerCache:
        """One block's compressed cache (views of its rows)."""
        return Q4LayerCache(self.keys[index], self.values[index], self.layout)
