"""Load a span of blocks straight from a GGUF file, in a chosen weight format.

A Q4_0/Q4_1 file served in q4 with groups of 32 keeps the file's own codes (and a Q8_0
one served in int8 its own), so the 4-bit model never exists in float32 anywhere; other
pairs of file type and format are converted one projection at a time, in memory.
"""

from __future__ import annotations

from pathlib import Path

import torch
from volunteer.models.config import ModelConfig
from volunteer.models.gguf_compressed import gguf_block_weights
from volunteer.models.gguf_file import read_gguf
from volunteer.models.int8_weight import Int8Weight
from volunteer.models.model import BlockSpan
from volunteer.models.q4_weight import Q4Weight
from volunteer.models.rope import RotaryTable
from volunteer.models.weight_format import PROJECTIONS, WeightFormat, set_projection

_PROJECTION_NAMES = frozenset(f"{outer}.{inner}.weight" for outer, inner in PROJECTIONS)


def load_span_gguf(
    path: Path, config: ModelConfig, start: int, end: int, *, fmt: WeightFormat
) -> BlockSpan:
    """Blocks [start, end) of the GGUF file at `path`, on the CPU, in `fmt`.

    Raises:
        CheckpointError: the file lacks a tensor, or one is damaged or misshapen.
    """
    with torch.device("meta"):
        span = BlockSpan(config, start, end)
    dtype = fmt.activation_dtype
    with read_gguf(path) as gguf_file:
        for offset, index in enumerate(range(start, end)):
            block = span.blocks[offset]
            weights = gguf_block_weights(
                gguf_file,
                config,
                index,
                group_size=fmt.group_size if fmt.dtype == "q4" else None,
                keep_int8=fmt.dtype == "int8",
            )
            state = {}
            for name, weight in weights.items():
                if name not in _PROJECTION_NAMES:
                    state[name] = weight.to(dtype)
                    continue
                kept = _in_format(weight, fmt)
                if isinstance(kept, torch.Tensor):
                    state[name] = kept
                else:
                    set_projection(block, name, kept)
            block.load_state_dict(state, assign=True, strict=True)
    span.forget_weights()
    span.rotary = RotaryTable(config).to(dtype=dtype)
    return span


def _in_format(
    weight: torch.Tensor | Q4Weight | Int8Weight, fmt: WeightFormat
) -> torch.Tensor | Q4Weight | Int8Weight:
    """A projection as read, in `fmt`: kept when the file's form is the format's own."""
    if isinstance(weight, Q4Weight) and fmt.dtype == "q4" and weight.group_size == fmt.group_size:
        return weight
    if isinstance(weight, Int8Weight) and fmt.dtype == "int8":
        return weight
    if not isinstance(weight, torch.Tensor):
        weight = weight.dequantize(torch.float32)
    return fmt.compress(weight)
