"""Keys and values kept in FlexGen's group-wise 4 bits, read back for attention.

FlexGen (see `shared/seeds/`) compresses the attention cache as it does weights: groups
of values along head_dim, each stored as 4-bit codes between the group's minimum and
maximum (x ≈ minimum + code * step, step = (maximum - minimum) / 15), so that every
value is off by at most half a step. The accuracy this costs, negligible for FlexGen's
OPT models, is larger for RoPE models, whose keys have outlier channels (see
`KV_GROUP_SIZE`). A position's keys for one head take one uint8 row::

    [ D/2 bytes of codes | (step, minimum) float16 per group ]

Byte j holds element j in its low nibble and element j + D/2 in its high one, so that
unpacking is a mask and a shift into two halves, no interleaving. A row is a quarter of
the head's bytes in a 16-bit cache plus 4 bytes per group; FlexGen keeps the step and
minimum in the activations' float16 too.

A layer's cache is a `Q4LayerCache`: `write` quantizes new keys and values into their
positions and `read` dequantizes every position up to an end. Attention then sees
exactly what is stored, so a sequence gives the same outputs whichever way its tokens
are split into calls. Each read dequantizes the whole prefix (FlexGen does the same):
that is the price of the smaller cache, paid in elementwise work per decode step.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Protocol

import torch
from volunteer.models.quant import QuantError

LEVELS = 15
"""The largest 4-bit code: a group's range spans LEVELS steps."""
KV_GROUP_SIZE = 32
"""Values per group by default (FlexGen's cache uses 64). RoPE models' keys have a few
outlier channels that set most groups' range and so every other value's step; smaller
groups confine them, and on SmolLM2 32 loses clearly less log-probability than 64 for
4 more bytes a row (`tests/models/test_kv_cache_q4.py`)."""
SCALE_DTYPE = torch.float16
"""Step and minimum, as FlexGen keeps them. (Keys and values beyond ±65504 would
overflow it; Llama-family ones stay far inside.)"""
MIN_STEP = 2.0**-24
"""float16's smallest step above zero: a constant group keeps a step it can divide by,
and its values come back as its minimum."""
_NIBBLES = {  # a wide integer view unpacks several bytes per element: mask per width
    torch.int64: 0x0F0F0F0F0F0F0F0F,
    torch.int32: 0x0F0F0F0F,
    torch.int16: 0x0F0F,
    torch.uint8: 0x0F,
}


class CompressedLayerCache(Protocol):
    """What attention needs of one block's cache held compressed (a float cache is a
    (keys, values) pair of tensors instead: `volunteer.models.kv_cache`)."""

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Stores keys and values [B, kv_heads, S, D] at positions [start, start + S)."""
        ...

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, end, D] of positions [0, end)."""
        ...


@dataclasses.dataclass(frozen=True)
class Q4Layout:
    """How a head's D values are packed into one row, and what `read` returns."""

    head_dim: int
    group_size: int
    dtype: torch.dtype
    """Keys and values come back in this dtype (the model's)."""

    @classmethod
    def of(cls, head_dim: int, dtype: torch.dtype, group_size: int | None = None) -> Q4Layout:
        """The layout for heads of `head_dim` (group size by default `default_group_size`).

        Raises:
            QuantError: head_dim is not a multiple of 4 (half a row of codes must hold
                whole float16s after it), or the group size does not divide it.
        """
        if head_dim % 4:
            raise QuantError(f"a 4-bit KV cache needs head_dim a multiple of 4, not {head_dim}")
        group_size = default_group_size(head_dim) if group_size is None else group_size
        if group_size < 1 or head_dim % group_size:
            raise QuantError(f"group size {group_size} does not divide head_dim {head_dim}")
        return cls(head_dim=head_dim, group_size=group_size, dtype=dtype)

    @property
    def groups(self) -> int:
        return self.head_dim // self.group_size

    @property
    def wide_dtype(self) -> torch.dtype:
        """The widest integer whose size divides both the codes and a row: the element
        unpacking reads its codes as."""
        sizes = (self.head_dim // 2, self.row_bytes)
        return next(t for t in _NIBBLES if all(size % t.itemsize == 0 for size in sizes))

    @property
    def row_bytes(self) -> int:
        """Bytes per position and head: codes, then (step, minimum) per group."""
        return self.head_dim // 2 + 2 * SCALE_DTYPE.itemsize * self.groups

    def read_workspace_bytes(self, rows: int) -> int:
        """Memory one `read` of `rows` positions and heads (keys and values together)
        allocates while it runs: the rows gathered, codes unpacked, the output."""
        per_row = self.row_bytes + self.head_dim * (1 + self.dtype.itemsize)
        return 2 * rows * (per_row + 2 * 4 * self.groups)


def default_group_size(head_dim: int) -> int:
    """KV_GROUP_SIZE where it divides head_dim, else the largest power of two that does."""
    return math.gcd(head_dim, KV_GROUP_SIZE)


def quantize_rows(x: torch.Tensor, layout: Q4Layout) -> torch.Tensor:
    """Values [..., D] -> uint8 rows [..., row_bytes] (min/max per group, codes rounded
    to the nearest of the 16 levels that the stored float16 step and minimum give)."""
    *lead, dim = x.shape
    half, groups = dim // 2, layout.groups
    # [..., D] -> [..., groups, group_size]
    grouped = x.reshape(*lead, groups, layout.group_size)
    low, high = torch.aminmax(grouped, dim=-1, keepdim=True)
    # Codes are computed against the rounded step and minimum, the ones `read` uses.
    minimum = low.to(SCALE_DTYPE)
    step = (high - minimum).div_(LEVELS).clamp_min_(MIN_STEP).to(SCALE_DTYPE)
    codes = (grouped - minimum).div_(step).round_().clamp_(0, LEVELS)
    # [..., groups, group_size] -> [..., 2, D/2]: element j and element j + D/2 share a byte
    halves = codes.view(*lead, 2, half)
    rows = torch.empty(*lead, layout.row_bytes, dtype=torch.uint8, device=x.device)
    rows[..., :half].copy_(torch.add(halves[..., 0, :], halves[..., 1, :], alpha=16))
    _scales(rows, layout).copy_(torch.cat((step, minimum), dim=-1))
    return rows


def dequantize_rows(rows: Sequence[torch.Tensor], layout: Q4Layout) -> torch.Tensor:
    """uint8 rows [..., row_bytes] of tensors alike (a block's keys and values: one pass
    of ops for both) -> values [len(rows), ..., D] in the layout's dtype."""
    half, wide = layout.head_dim // 2, layout.wide_dtype
    # As wide integers, a row's codes are a few elements (8 bytes each where they fit):
    # gathering them contiguous first keeps the unpacking ops vectorized.
    words = [r.view(wide) for r in rows]
    split = half // wide.itemsize
    codes = torch.stack([w[..., :split] for w in words])
    step_min = torch.stack([w[..., split:] for w in words]).view(SCALE_DTYPE).float()
    lead = codes.shape[:-1]
    # Low nibbles are the first half of each row, high ones the second.
    values = torch.empty(*lead, 2, half, dtype=layout.dtype, device=codes.device)
    mask = _NIBBLES[wide]
    values[..., 0, :].copy_((codes & mask).view(torch.uint8))
    values[..., 1, :].copy_((codes >> 4).bitwise_and_(mask).view(torch.uint8))
    # [..., 2, D/2] -> [..., groups, group_size]; in place, in two passes: one addcmul with
    # broadcast scales is slower on CPUs.
    values = values.view(*lead, layout.groups, layout.group_size)
    step_min = step_min.view(*lead, layout.groups, 2)
    values.mul_(step_min[..., :1]).add_(step_min[..., 1:])
    return values.view(*lead, layout.head_dim)


def _scales(rows: torch.Tensor, layout: Q4Layout) -> torch.Tensor:
    """The (step, minimum) pairs of rows [..., row_bytes], as [..., groups, 2] (a view)."""
    *lead, _ = rows.shape
    return rows[..., layout.head_dim // 2 :].view(SCALE_DTYPE).view(*lead, layout.groups, 2)


class Q4LayerCache:
    """One block's keys and values as 4-bit rows [B, kv_heads, T, row_bytes] each (for
    inference: no gradient reaches keys or values through their codes)."""

    __slots__ = ("keys", "layout", "values")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, layout: Q4Layout) -> None:
        self.keys = keys
        self.values = values
        self.layout = layout

    def write(self, start: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Quantizes keys and values [B, kv_heads, S, D] into positions [start, start + S)."""
        seq = keys.shape[2]
        # Keys and values together: one pass of small ops instead of two.
        rows = quantize_rows(torch.stack((keys, values)), self.layout)
        self.keys.narrow(2, start, seq).copy_(rows[0])
        self.values.narrow(2, start, seq).copy_(rows[1])

    def read(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [B, kv_heads, end, D] of positions [0, end), dequantized into
        new tensors."""
        rows = (self.keys.narrow(2, 0, end), self.values.narrow(2, 0, end))
        values = dequantize_rows(rows, self.layout)
        return values[0], values[1]
