"""Steps of several inference sessions through a span as one batch (continuous batching).

Decoding one position is mostly fixed cost per op on a CPU (dispatch, thread wake-ups)
and weight reads on a GPU; the work per row is small. So the rows of every session in a
batch go through the norms, the q/k/v and output projections, RoPE and the MLP as one
matrix of all their positions, and only attention runs per session, over that session's
own cache at its own position: ragged lengths cost no padding and no copies of caches.

Each part is one session's step ([B, S, H] at `start_pos`, rewinding if that is below
its cache's length) with its own cache; every part must run on the same blocks. The
caller advances each cache's length, as after `BlockSpan.forward`.
"""

from __future__ import annotations

import dataclasses

import torch
from volunteer.models.block import BlockShape, BlockWeights, attend, mlp, rms_norm, rotated_qkv
from volunteer.models.kv_cache import KVCache
from volunteer.models.model import BlockSpan
from volunteer.models.quant import linear


@dataclasses.dataclass(frozen=True)
class StepPart:
    """One session's share of a batched step."""

    hidden: torch.Tensor
    """Its new positions' hidden states [B, S, H], in the span's dtype and device."""
    start_pos: int
    cache: KVCache
    """Its cache, whose layer 0 is the first block run."""


def span_step_batch(
    span: BlockSpan, parts: list[StepPart], *, first: int = 0, last: int | None = None
) -> list[torch.Tensor]:
    """Runs every part through the span's blocks [first, last) (counted from the span's
    start) and returns each part's output, shaped as its input."""
    last = span.num_blocks if last is None else last
    hidden_size = span.config.hidden_size
    rows = [part.hidden.shape[0] * part.hidden.shape[1] for part in parts]
    x = torch.cat([part.hidden.reshape(-1, hidden_size) for part in parts])
    # One cos / sin row per row of x: each part's positions, repeated over its batch.
    angles = [_angles(span, part) for part in parts]
    cos = torch.cat([cos for cos, _ in angles])
    sin = torch.cat([sin for _, sin in angles])
    shape = span.blocks[0].shape
    weights = span.weights_for(first, last)
    for layer, block_weights in enumerate(weights):
        x = _block_batch(x, block_weights, shape, cos, sin, parts, rows, layer)
    return [out.view(part.hidden.shape) for out, part in zip(x.split(rows), parts, strict=True)]


def _angles(span: BlockSpan, part: StepPart) -> tuple[torch.Tensor, torch.Tensor]:
    """cos / signed sin for each of the part's rows, [B * S, 1, D]."""
    batch, seq = part.hidden.shape[0], part.hidden.shape[1]
    cos, sin = span.rotary.slice(part.start_pos, seq)
    return cos.repeat(batch, 1, 1), sin.repeat(batch, 1, 1)


def _block_batch(
    x: torch.Tensor,
    w: BlockWeights,
    shape: BlockShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    parts: list[StepPart],
    rows: list[int],
    layer: int,
) -> torch.Tensor:
    """One block over the batch's rows x [T, H]: `models.block.block_forward` with the
    attention split by part."""
    h = rms_norm(x, w.attn_norm, shape.eps)
    qkv = linear(h, w.qkv, w.qkv_bias).view(x.shape[0], -1, shape.head_dim)
    q, k, v = rotated_qkv(qkv, shape, cos, sin)
    outs = []
    begin = 0
    for part, count in zip(parts, rows, strict=True):
        batch, seq = part.hidden.shape[0], part.hidden.shape[1]
        piece = [t.narrow(0, begin, count).unflatten(0, (batch, seq)) for t in (q, k, v)]
        out = attend(*piece, shape, start_pos=part.start_pos, layer_cache=part.cache.layer(layer))
        outs.append(out.reshape(count, -1))
        begin += count
    attended = outs[0] if len(outs) == 1 else torch.cat(outs)
    x = x + linear(attended, w.o, w.o_bias, exact_dtype=False)
    return x + mlp(rms_norm(x, w.mlp_norm, shape.eps), w, shape)
