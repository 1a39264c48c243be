"""What a fine-tuning client adds to frozen blocks: deep prompts and LoRA adapters.

A client trains these; a server applies the ones a request carries to that request only,
and hands back their gradients. Nothing here is ever written into the blocks' weights.

- Deep prompts (Petals' deep prompt tuning): a trainable [P, H] tensor per block, added to
  the first P positions of that block's input (the client puts P prompt positions in
  front of the tokens).
- LoRA: a low-rank update `scale * B @ A` next to each of the block's fused projections
  (`LORA_TARGETS`: q/k/v together, the attention output, gate/up together, down). On the
  fused q/k/v and gate/up projections the adapter shares one A between the parts, which
  is one adapter of the fused matrix: the same function class per rank as PEFT's when
  every part is adapted, with fewer parameters.

The tensors of a span are stacked over its blocks, so a span's adapter is a handful of
tensors whatever its length, and a sub-span's is a narrow view of them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from volunteer.models.config import ModelConfig
from volunteer.models.quant import CompressedWeight, linear

LORA_TARGETS = ("qkv", "o", "gate_up", "down")
"""The projections LoRA can adapt, in the order their tensors travel."""


def lora_dims(config: ModelConfig, target: str) -> tuple[int, int]:
    """(in_features, out_features) of one adaptable projection."""
    hidden, inner = config.hidden_size, config.intermediate_size
    return {
        "qkv": (hidden, config.q_size + 2 * config.kv_size),
        "o": (config.q_size, hidden),
        "gate_up": (hidden, 2 * inner),
        "down": (inner, hidden),
    }[target]


@dataclasses.dataclass(frozen=True)
class AdapterLayout:
    """The shape of an adapter, besides the model's: what a request says it carries."""

    prompt_len: int = 0
    """P deep-prompt positions per block (0: none)."""
    rank: int = 0
    """LoRA rank r (0: no LoRA)."""
    targets: tuple[str, ...] = ()
    scale: float = 1.0
    """LoRA's alpha / r."""

    def __post_init__(self) -> None:
        if self.prompt_len < 0 or self.rank < 0:
            raise ValueError("prompt_len and rank must be >= 0")
        if any(t not in LORA_TARGETS for t in self.targets) or len(set(self.targets)) != len(
            self.targets
        ):
            raise ValueError(f"LoRA targets must be distinct names among {LORA_TARGETS}")
        if bool(self.rank) != bool(self.targets):
            raise ValueError("LoRA needs both a rank and targets")
        if not math.isfinite(self.scale):
            raise ValueError("LoRA scale must be finite")

    def shapes(self, config: ModelConfig, num_blocks: int) -> list[tuple[int, ...]]:
        """The shapes of `SpanAdapter.tensors()` for `num_blocks` blocks, in their order."""
        shapes: list[tuple[int, ...]] = []
        if self.prompt_len:
            shapes.append((num_blocks, self.prompt_len, config.hidden_size))
        for target in self.targets:
            fan_in, fan_out = lora_dims(config, target)
            shapes += [(num_blocks, self.rank, fan_in), (num_blocks, fan_out, self.rank)]
        return shapes


class BlockLora(NamedTuple):
    """One block's LoRA pairs (A [r, in], B [out, r]) per target, None where not adapted."""

    qkv: tuple[torch.Tensor, torch.Tensor] | None
    o: tuple[torch.Tensor, torch.Tensor] | None
    gate_up: tuple[torch.Tensor, torch.Tensor] | None
    down: tuple[torch.Tensor, torch.Tensor] | None
    scale: float


@dataclasses.dataclass(frozen=True)
class SpanAdapter:
    """The adapter tensors for a run of blocks, stacked over the blocks (index 0 is the
    run's first block)."""

    layout: AdapterLayout
    tensors: tuple[torch.Tensor, ...]
    """In `AdapterLayout.shapes` order: the deep prompts, then A and B per target."""

    @classmethod
    def of(
        cls, layout: AdapterLayout, tensors: Sequence[torch.Tensor], config: ModelConfig
    ) -> SpanAdapter:
        """Checks the tensors against the layout for their number of blocks.

        Raises:
            ValueError: a count or a shape that the layout does not give.
        """
        expected_count = len(layout.shapes(config, 1))
        if len(tensors) != expected_count:
            raise ValueError(f"adapter needs {expected_count} tensors, got {len(tensors)}")
        if not tensors:
            raise ValueError("an adapter needs at least one tensor")
        blocks = tensors[0].shape[0] if tensors[0].dim() else 0
        shapes = layout.shapes(config, blocks)
        for index, (tensor, shape) in enumerate(zip(tensors, shapes, strict=True)):
            if tuple(tensor.shape) != shape:
                got, want = list(tensor.shape), list(shape)
                raise ValueError(f"adapter tensor {index} is {got}, not {want}")
        return cls(layout, tuple(tensors))

    @property
    def num_blocks(self) -> int:
        return self.tensors[0].shape[0]

    @property
    def prompts(self) -> torch.Tensor | None:
        return self.tensors[0] if self.layout.prompt_len else None

    def narrow(self, first: int, count: int) -> SpanAdapter:
        """Blocks [first, first + count) of this adapter (views, gradients flow through)."""
        return SpanAdapter(self.layout, tuple(t.narrow(0, first, count) for t in self.tensors))

    def block_lora(self, index: int) -> BlockLora | None:
        """Block `index`'s LoRA pairs, or None without LoRA."""
        if not self.layout.rank:
            return None
        offset = 1 if self.layout.prompt_len else 0
        pairs: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = dict.fromkeys(LORA_TARGETS)
        for number, target in enumerate(self.layout.targets):
            a, b = self.tensors[offset + 2 * number], self.tensors[offset + 2 * number + 1]
            pairs[target] = (a[index], b[index])
        return BlockLora(**pairs, scale=self.layout.scale)

    def add_prompt(self, hidden: torch.Tensor, index: int, start_pos: int) -> torch.Tensor:
        """Block `index`'s deep prompt added to the positions of [start_pos, start_pos + S)
        that fall in [0, P)."""
        prompts = self.prompts
        if prompts is None or start_pos >= self.layout.prompt_len:
            return hidden
        count = min(self.layout.prompt_len - start_pos, hidden.shape[1])
        prompt = prompts[index, start_pos : start_pos + count].to(hidden.dtype)
        return torch.cat([hidden[:, :count] + prompt, hidden[:, count:]], dim=1)

    def to(self, *, device: torch.device, dtype: torch.dtype) -> SpanAdapter:
        moved = tuple(t.to(device=device, dtype=dtype) for t in self.tensors)
        return SpanAdapter(self.layout, moved)


def lora_linear(
    x: torch.Tensor,
    weight: torch.Tensor | CompressedWeight,
    bias: torch.Tensor | None,
    pair: tuple[torch.Tensor, torch.Tensor] | None,
    scale: float,
) -> torch.Tensor:
    """`linear(x, weight, bias)`, plus `scale * B A x` when the projection is adapted."""
    out = linear(x, weight, bias)
    if pair is None:
        return out
    a, b = pair
    low = torch.nn.functional.linear(x, a.to(x.dtype))
    return out + torch.nn.functional.linear(low, b.to(x.dtype)) * scale
