"""One Llama-family transformer block in plain torch.

RMSNorm -> grouped-query attention with RoPE (keys/values written into a preallocated
per-session cache) -> residual -> RMSNorm -> SwiGLU MLP -> residual. The q/k/v
projections are fused into one matmul, and so are gate/up: fewer, larger matmuls are
what makes small-batch decoding fast on CPUs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.config import ModelConfig
from models.rope import apply_rotary


class RMSNorm(nn.Module):
    """Root-mean-square layer norm with a learned scale, computed in float32."""

    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32, then scale in the input dtype, as the reference
        # checkpoints were trained. (Spelled out: torch's fused rms_norm is slower on CPU
        # for the one-token rows of decoding.)
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention; q/k/v come from one fused projection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.sliding_window = config.sliding_window
        self.split_sizes = [config.q_size, config.kv_size, config.kv_size]
        self.qkv_proj = nn.Linear(
            config.hidden_size, config.q_size + 2 * config.kv_size, bias=config.qkv_bias
        )
        self.o_proj = nn.Linear(config.q_size, config.hidden_size, bias=config.o_bias)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        start_pos: int,
        layer_cache: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        # [B, S, (heads + 2 * kv_heads) * D] -> [B, S, heads + 2 * kv_heads, D]
        qkv = self.qkv_proj(x).view(batch, seq, -1, self.head_dim)
        # q and k rotate together: one set of elementwise ops instead of two.
        qk = apply_rotary(qkv[:, :, : self.num_heads + self.num_kv_heads], cos, sin)
        # [B, S, heads, D] -> [B, heads, S, D]
        q = qk[:, :, : self.num_heads].transpose(1, 2)
        k = qk[:, :, self.num_heads :].transpose(1, 2)
        v = qkv[:, :, self.num_heads + self.num_kv_heads :].transpose(1, 2)
        if layer_cache is not None:
            key_buf, value_buf = layer_cache
            end = start_pos + seq
            key_buf[:, :, start_pos:end] = k
            value_buf[:, :, start_pos:end] = v
            k, v = key_buf[:, :, :end], value_buf[:, :, :end]
            mask, is_causal = self._mask(seq, start_pos, x.device)
        else:
            mask, is_causal = self._mask(seq, 0, x.device)
        if seq == 1 and mask is None:
            out = self._decode_attention(q, k, v)
        else:
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, is_causal=is_causal, enable_gqa=True
            )
        # [B, heads, S, D] -> [B, S, heads * D]
        out = out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim)
        return self.o_proj(out)

    def _decode_attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One query per row against every cached key, without SDPA's fixed overhead.

        q: [B, heads, 1, D]; k, v: [B, kv_heads, T, D]; returns [B, heads, 1, D].
        """
        batch = q.shape[0]
        group = self.num_heads // self.num_kv_heads
        # The query heads that share a kv head become rows of one matmul:
        # [B, heads, 1, D] -> [B, kv_heads, group, D]
        q = q.reshape(batch, self.num_kv_heads, group, self.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim**-0.5
        out = torch.matmul(torch.softmax(scores.float(), dim=-1).to(v.dtype), v)
        return out.reshape(batch, self.num_heads, 1, self.head_dim)

    def _mask(self, seq: int, past: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """Attention mask for `seq` new queries after `past` cached positions.

        Returns (mask, is_causal); the cheap built-in causal path is used when it is exact.
        """
        total = past + seq
        is_windowed = self.sliding_window is not None and total > self.sliding_window
        if not is_windowed:
            if seq == 1:
                return None, False
            if past == 0:
                return None, True
        query_pos = torch.arange(past, total, device=device)[:, None]
        key_pos = torch.arange(total, device=device)[None, :]
        mask = key_pos <= query_pos
        if self.sliding_window is not None:
            mask &= key_pos > query_pos - self.sliding_window
        return mask, False


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), gate and up fused."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.intermediate_size = config.intermediate_size
        self.gate_up_proj = nn.Linear(
            config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias
        )
        self.down_proj = nn.Linear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.intermediate_size, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm decoder block: attention then MLP, each with a residual connection."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = Attention(config)
        self.mlp_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        *,
        start_pos: int,
        layer_cache: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, start_pos=start_pos, layer_cache=layer_cache)
        return x + self.mlp(self.mlp_norm(x))
