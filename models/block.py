"""One Llama-family transformer block in plain torch.

RMSNorm -> grouped-query attention with RoPE (keys/values written into a preallocated
per-session cache) -> residual -> RMSNorm -> SwiGLU MLP -> residual. The q/k/v
projections are fused into one matmul, and so are gate/up: fewer, larger matmuls are
what makes small-batch decoding fast on CPUs.

The computation is written once, as functions over a `BlockWeights` tuple; the modules
hold the parameters (for loading, training and state dicts) and call the same functions.
A span decoding one token calls them directly with weights gathered once per step, which
skips most of nn.Module's per-call overhead: at batch 1 on a CPU that overhead is a
large share of a small model's step time.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from volunteer.models.adapters import BlockLora, lora_linear
from volunteer.models.config import ModelConfig
from volunteer.models.kv_cache import LayerCache
from volunteer.models.quant import CompressedWeight, linear
from volunteer.models.rope import apply_rotary


class BlockWeights(NamedTuple):
    """The tensors of one block, gathered for the functional forward (the projections
    possibly compressed: `volunteer.models.quant`)."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor | CompressedWeight
    qkv_bias: torch.Tensor | None
    o: torch.Tensor | CompressedWeight
    o_bias: torch.Tensor | None
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor | CompressedWeight
    gate_up_bias: torch.Tensor | None
    down: torch.Tensor | CompressedWeight
    down_bias: torch.Tensor | None


@dataclasses.dataclass(frozen=True)
class BlockShape:
    """The sizes a block's forward needs besides its weights."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    eps: float
    sliding_window: int | None

    @classmethod
    def of(cls, config: ModelConfig) -> BlockShape:
        return cls(
            num_heads=config.num_heads,
            num_kv_heads=config.num_kv_heads,
            head_dim=config.head_dim,
            intermediate_size=config.intermediate_size,
            eps=config.rms_norm_eps,
            sliding_window=config.sliding_window,
        )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Root-mean-square norm with a learned scale, computed in float32."""
    x32 = x if x.dtype == torch.float32 else x.float()
    size = x.shape[-1]
    # hypot(|x|, sqrt(n * eps)) = sqrt(n) * sqrt(mean(x^2) + eps): the same norm in
    # two ops where F.rms_norm's CPU path dispatches seven, and a decode step runs
    # two norms per block on a single row, where dispatch is most of the cost.
    norm = torch.hypot(
        torch.linalg.vector_norm(x32, dim=-1, keepdim=True), _eps_term(size * eps, x.device)
    )
    if x.dtype == torch.float32:
        return x32 * weight / norm * math.sqrt(size)
    # Low precision: normalise in float32, then scale in the input dtype, as the
    # reference checkpoints were trained.
    return weight * (x32 / norm * math.sqrt(size)).to(x.dtype)


@functools.cache
def _eps_term(value: float, device: torch.device) -> torch.Tensor:
    # A normal tensor even when first asked for under inference mode: autograd may
    # save it for a backward later.
    with torch.inference_mode(False):
        return torch.tensor(math.sqrt(value), dtype=torch.float32, device=device)


def block_forward(
    x: torch.Tensor,
    w: BlockWeights,
    shape: BlockShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    start_pos: int,
    layer_cache: LayerCache | None,
    lora: BlockLora | None = None,
) -> torch.Tensor:
    """Pre-norm decoder block on hidden states x [B, S, H] (with a request's LoRA pairs
    next to its projections, if given: `volunteer.models.adapters`)."""
    h = rms_norm(x, w.attn_norm, shape.eps)
    x = x + attention(
        h, w, shape, cos, sin, start_pos=start_pos, layer_cache=layer_cache, lora=lora
    )
    h = rms_norm(x, w.mlp_norm, shape.eps)
    if lora is None:
        return x + mlp(h, w, shape)
    gate_up = lora_linear(h, w.gate_up, w.gate_up_bias, lora.gate_up, lora.scale)
    gate, up = gate_up.split(shape.intermediate_size, dim=-1)
    return x + lora_linear(F.silu(gate) * up, w.down, w.down_bias, lora.down, lora.scale)


def mlp(h: torch.Tensor, w: BlockWeights, shape: BlockShape) -> torch.Tensor:
    """The SwiGLU feed-forward of normed h [..., H], without its residual."""
    # Compressed weights may answer in their kernels' dtype: the SwiGLU product goes
    # into the next kernel in it, and the residual add takes either.
    gate_up = linear(h, w.gate_up, w.gate_up_bias, exact_dtype=False)
    gate, up = gate_up.split(shape.intermediate_size, dim=-1)
    return linear(F.silu(gate) * up, w.down, w.down_bias, exact_dtype=False)


def attention(
    x: torch.Tensor,
    w: BlockWeights,
    shape: BlockShape,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    start_pos: int,
    layer_cache: LayerCache | None,
    lora: BlockLora | None = None,
) -> torch.Tensor:
    """Grouped-query self-attention of x [B, S, H] with RoPE and an optional KV cache."""
    batch, seq, _ = x.shape
    if lora is None:
        qkv = linear(x, w.qkv, w.qkv_bias)
    else:
        qkv = lora_linear(x, w.qkv, w.qkv_bias, lora.qkv, lora.scale)
    # [B, S, (heads + 2 * kv_heads) * D] -> [B, S, heads + 2 * kv_heads, D]
    q, k, v = rotated_qkv(qkv.view(batch, seq, -1, shape.head_dim), shape, cos, sin)
    out = attend(q, k, v, shape, start_pos=start_pos, layer_cache=layer_cache)
    if lora is None:
        return linear(out, w.o, w.o_bias, exact_dtype=False)  # into the residual add
    return lora_linear(out, w.o, w.o_bias, lora.o, lora.scale)


def rotated_qkv(
    qkv: torch.Tensor, shape: BlockShape, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The fused projection's output [..., heads + 2 * kv_heads, D] as q, k (rotated by
    cos / sin) and v, each [..., heads or kv_heads, D]."""
    heads, kv_heads = shape.num_heads, shape.num_kv_heads
    dim = qkv.dim() - 2
    # q and k rotate together: one set of elementwise ops instead of two. (narrow rather
    # than slicing syntax: it is one dispatch, and this runs for every block and token.)
    qk = apply_rotary(qkv.narrow(dim, 0, heads + kv_heads), cos, sin)
    return (
        qk.narrow(dim, 0, heads),
        qk.narrow(dim, heads, kv_heads),
        qkv.narrow(dim, heads + kv_heads, kv_heads),
    )


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    shape: BlockShape,
    *,
    start_pos: int,
    layer_cache: LayerCache | None,
) -> torch.Tensor:
    """Attention of rotated q [B, S, heads, D] over k, v [B, S, kv_heads, D] and the
    cached positions before start_pos (where the new keys/values are written), as
    [B, S, heads * D] before the output projection."""
    batch, seq = q.shape[0], q.shape[1]
    # [B, S, heads, D] -> [B, heads, S, D]
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    past = 0
    if layer_cache is not None:
        past = start_pos
        if isinstance(layer_cache, tuple):
            key_buf, value_buf = layer_cache
            key_buf.narrow(2, past, seq).copy_(k)
            value_buf.narrow(2, past, seq).copy_(v)
            k, v = key_buf.narrow(2, 0, past + seq), value_buf.narrow(2, 0, past + seq)
        else:  # held compressed: `volunteer.models.kv_quant`
            layer_cache.write(past, k, v)
            k, v = layer_cache.read(past + seq)
    mask, is_causal = _attention_mask(seq, past, shape.sliding_window, q.device)
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True
    )
    # [B, heads, S, D] -> [B, S, heads * D]
    return out.transpose(1, 2).reshape(batch, seq, shape.num_heads * shape.head_dim)


def _attention_mask(
    seq: int, past: int, window: int | None, device: torch.device
) -> tuple[torch.Tensor | None, bool]:
    """Mask for `seq` new queries after `past` cached positions: (mask, is_causal).

    The built-in causal path (or no mask at all for one query) is used when it is exact.
    """
    total = past + seq
    if window is None or total <= window:
        if seq == 1:
            return None, False
        if past == 0:
            return None, True
    query_pos = torch.arange(past, total, device=device)[:, None]
    key_pos = torch.arange(total, device=device)[None, :]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    return mask, False


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)


class Attention(nn.Module):
    """The attention parameters; q/k/v come from one fused projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)


class MLP(nn.Module):
    """The SwiGLU feed-forward parameters, gate and up fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: attention then MLP, each with a residual connection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.shape = BlockShape.of(config)
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def weights(self) -> BlockWeights:
        """The block's current parameter tensors (the same objects, not copies)."""
        attn, mlp = self.attn, self.mlp
        return BlockWeights(
            attn_norm=self.attn_norm.weight,
            qkv=attn.qkv_proj.weight,
            qkv_bias=attn.qkv_proj.bias,
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            mlp_norm=self.mlp_norm.weight,
            gate_up=mlp.gate_up_proj.weight,
            gate_up_bias=mlp.gate_up_proj.bias,
            down=mlp.down_proj.weight,
            down_bias=mlp.down_proj.bias,
        )

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        start_pos: int,
        layer_cache: LayerCache | None = None,
    ) -> torch.Tensor:
        return block_forward(
            x, self.weights(), self.shape, cos, sin, start_pos=start_pos, layer_cache=layer_cache
        )
