"""The form a span's weights are held in: float32, bfloat16, int8 or 4-bit groups.

A `WeightFormat` names it (`fp32`, `bf16`, `int8`, `q4`, with the 4-bit group size:
`q4g32`); servers announce it in their records, and a route keeps to one format, so
that a client's checks recompute a server's work in the form the server computed it.
`compress_block` turns a loaded block's projections into that form in place.
"""

from __future__ import annotations

import dataclasses
import re

import torch
from torch import nn
from volunteer.models.int8_weight import Int8Weight
from volunteer.models.q4_weight import Q4_ROW_MULTIPLE, Q4Weight
from volunteer.models.quant import (
    DEFAULT_GROUP_SIZE,
    CompressedWeight,
    QuantError,
    check_group_size,
    round_up,
)

WEIGHT_DTYPES = ("fp32", "bf16", "int8", "q4")
_LABEL_RE = re.compile(r"(fp32|bf16|int8)|q4(?:g(\d{1,4}))?")
PROJECTIONS = (
    ("attn", "qkv_proj"),
    ("attn", "o_proj"),
    ("mlp", "gate_up_proj"),
    ("mlp", "down_proj"),
)
"""The linear layers of a block, as (module, submodule) names: what compression takes."""


@dataclasses.dataclass(frozen=True)
class WeightFormat:
    dtype: str = "fp32"
    """One of WEIGHT_DTYPES."""
    group_size: int = DEFAULT_GROUP_SIZE
    """Inputs per 4-bit group (q4 only)."""

    def __post_init__(self) -> None:
        if self.dtype not in WEIGHT_DTYPES:
            raise QuantError(f"dtype {self.dtype!r} is not one of {', '.join(WEIGHT_DTYPES)}")
        check_group_size(self.group_size)

    @classmethod
    def parse(cls, label: str) -> WeightFormat:
        """From a label as `label` writes it ("q4" alone means the default group size)."""
        match = _LABEL_RE.fullmatch(label.strip().lower())
        if match is None:
            raise QuantError(
                f"{label!r} is not a weight format: use fp32, bf16, int8 or q4 (q4g64 for "
                f"groups of 64)"
            )
        if match.group(1):
            return cls(match.group(1))
        return cls("q4", int(match.group(2) or DEFAULT_GROUP_SIZE))

    @property
    def label(self) -> str:
        return f"q4g{self.group_size}" if self.dtype == "q4" else self.dtype

    @property
    def activation_dtype(self) -> torch.dtype:
        """The dtype of the hidden states and of the parameters kept as tensors (norms,
        biases); compressed matmuls cast to their kernels' dtype and back."""
        return torch.bfloat16 if self.dtype == "bf16" else torch.float32

    @property
    def is_compressed(self) -> bool:
        return self.dtype in ("int8", "q4")

    def projection_bytes(self, out_features: int, in_features: int) -> int:
        """Bytes one [out, in] projection takes held in this format (as `compress` makes
        it on the CPU: 4-bit codes, and a bfloat16 step and offset per group)."""
        if self.dtype == "q4":
            rows = round_up(out_features, Q4_ROW_MULTIPLE)
            cols = round_up(in_features, self.group_size)
            return rows * cols // 2 + rows * (cols // self.group_size) * 4
        if self.dtype == "int8":
            return out_features * in_features + out_features * 4
        return out_features * in_features * self.activation_dtype.itemsize

    def block_bytes(self, block: nn.Module) -> int:
        """Bytes a block's weights take in this format (`block` may be on meta)."""
        projections = [getattr(getattr(block, a), b).weight for a, b in PROJECTIONS]
        total = sum(self.projection_bytes(*w.shape) for w in projections)
        ids = {id(w) for w in projections}
        size = self.activation_dtype.itemsize
        return total + sum(p.numel() * size for p in block.parameters() if id(p) not in ids)

    def compress(self, weight: torch.Tensor) -> torch.Tensor | CompressedWeight:
        """One projection's weight in this format."""
        if self.dtype == "q4":
            return Q4Weight.quantize(weight, self.group_size)
        if self.dtype == "int8":
            return Int8Weight.quantize(weight)
        return weight.to(self.activation_dtype)


def compress_block(block: nn.Module, fmt: WeightFormat) -> None:
    """Replaces the projections' weights of a loaded block with their compressed form (a
    plain attribute, not a parameter: it is frozen, and `.to()` leaves it alone)."""
    if not fmt.is_compressed:
        return
    for outer, inner in PROJECTIONS:
        layer = getattr(getattr(block, outer), inner)
        weight = layer.weight
        if not isinstance(weight, torch.Tensor):
            continue  # already compressed (loaded so)
        compressed = fmt.compress(weight.detach())
        del layer.weight  # drops the parameter, and with it the float copy
        layer.weight = compressed


def compress_head(ends: nn.Module, fmt: WeightFormat) -> None:
    """Compresses the LM head of loaded `ModelEnds`, in 8 bits even for q4: 4-bit
    logits cost far more accuracy than 4-bit blocks do (llama.cpp's Q4 files keep their
    output matrix in 8 bits too). A tied embedding keeps its float table (a lookup reads
    only the rows it needs)."""
    if not fmt.is_compressed:
        return
    head = ends.lm_head
    compressed = Int8Weight.quantize(head.weight.detach())
    del head.weight  # unties it from the embedding, whose own parameter stays
    head.weight = compressed


def set_projection(block: nn.Module, name: str, weight: CompressedWeight) -> None:
    """Puts an already compressed weight (e.g. read from a GGUF file) in place of the
    projection `name` (as `BLOCK_TENSORS` names it, e.g. "attn.qkv_proj.weight")."""
    outer, inner, _ = name.split(".")
    layer = getattr(getattr(block, outer), inner)
    if tuple(weight.shape) != tuple(layer.weight.shape):
        raise QuantError(
            f"{name} is {tuple(weight.shape)}, but the config needs {tuple(layer.weight.shape)}"
        )
    del layer.weight
    layer.weight = weight
