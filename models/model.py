"""The model split the way the swarm needs it: a span of blocks, and the ends apart.

A server holds a `BlockSpan` (blocks [start, end)); a client holds `ModelEnds` (token
embedding, final norm, LM head); `CausalLM` joins the two for local, whole-model use.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from volunteer.models.adapters import SpanAdapter
from volunteer.models.block import BlockWeights, RMSNorm, TransformerBlock, block_forward
from volunteer.models.config import ModelConfig
from volunteer.models.kv_cache import KVCache, KVFormat
from volunteer.models.quant import linear
from volunteer.models.rope import RotaryTable


class BlockSpan(nn.Module):
    """Blocks [start, end) of a model, with the RoPE table they share."""

    def __init__(self, config: ModelConfig, start: int, end: int) -> None:
        super().__init__()
        if not 0 <= start < end <= config.num_layers:
            raise ValueError(f"bad block span {start}:{end} for {config.num_layers} blocks")
        self.config = config
        self.start = start
        self.end = end
        self.blocks = nn.ModuleList(TransformerBlock(config) for _ in range(start, end))
        self.rotary = RotaryTable(config)
        # Gathering each block's tensors through nn.Module attribute lookups costs about as
        # much as the small ops of a decode step, so they are gathered once and dropped
        # whenever parameters are replaced (loading, .to(), dtype casts).
        self._block_weights: list[BlockWeights] | None = None
        self.register_load_state_dict_post_hook(lambda module, _keys: module.forget_weights())

    @property
    def num_blocks(self) -> int:
        return self.end - self.start

    def forget_weights(self) -> None:
        """Drops the gathered block tensors; call after replacing any parameter."""
        self._block_weights = None

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        self.forget_weights()
        return super()._apply(fn, recurse)

    def forward(
        self,
        hidden: torch.Tensor,
        *,
        start_pos: int = 0,
        cache: KVCache | None = None,
        first: int = 0,
        last: int | None = None,
        adapter: SpanAdapter | None = None,
    ) -> torch.Tensor:
        """Runs hidden states [B, S, H] through the span's blocks [first, last) (counted
        from the span's start; default: all of them).

        With a cache (whose layer 0 is block `first`), the new keys/values are written at
        [start_pos, start_pos + S) and attention sees every earlier cached position; the
        caller advances `cache.length`. An adapter (covering exactly [first, last)) adds
        its deep prompts and LoRA pairs for this call only.
        """
        last = self.num_blocks if last is None else last
        seq = hidden.shape[1]
        cos, sin = self.rotary.slice(start_pos, seq)
        weights = self.weights_for(first, last)
        shape = self.blocks[0].shape
        for index, block_weights in zip(range(first, last), weights, strict=True):
            layer_cache = cache.layer(index - first) if cache is not None else None
            lora = None
            if adapter is not None:
                hidden = adapter.add_prompt(hidden, index - first, start_pos)
                lora = adapter.block_lora(index - first)
            # The functional forward, not block(...): see models.block on why.
            hidden = block_forward(
                hidden,
                block_weights,
                shape,
                cos,
                sin,
                start_pos=start_pos,
                layer_cache=layer_cache,
                lora=lora,
            )
        return hidden

    def weights_for(self, first: int, last: int) -> Iterable[BlockWeights]:
        """The tensors of blocks [first, last), in order (a span whose weights live on
        disk overrides this to stream them in: `volunteer.models.offload`)."""
        if self._block_weights is None:
            self._block_weights = [block.weights() for block in self.blocks]
        return self._block_weights[first:last]

    def allocate_cache(
        self,
        *,
        batch_size: int,
        max_length: int,
        dtype: torch.dtype | None = None,
        kv_format: KVFormat = "float",
    ) -> KVCache:
        """A cache sized for this span, on the span's device and dtype."""
        weight = self.blocks[0].attn_norm.weight  # (projections may be compressed)
        return KVCache.allocate(
            self.config,
            num_blocks=self.num_blocks,
            batch_size=batch_size,
            max_length=max_length,
            dtype=dtype or weight.dtype,
            device=weight.device,
            kv_format=kv_format,
        )


class ModelEnds(nn.Module):
    """Token embedding in front of the blocks; final norm and LM head behind them."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [B, S] -> hidden states [B, S, H]."""
        return self.embed_tokens(input_ids)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [B, S, H] -> logits [B, S, vocab]."""
        return linear(self.norm(hidden), self.lm_head.weight, self.lm_head.bias)


class CausalLM(nn.Module):
    """A whole model in one process: ends plus every block."""

    def __init__(self, ends: ModelEnds, span: BlockSpan) -> None:
        super().__init__()
        if span.start != 0 or span.end != span.config.num_layers:
            raise ValueError("CausalLM needs every block of the model")
        self.config = span.config
        self.ends = ends
        self.span = span

    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        start_pos: int = 0,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Token ids [B, S] -> logits [B, S, vocab] ([B, 1, vocab] with `last_only`)."""
        hidden = self.span(self.ends.embed(input_ids), start_pos=start_pos, cache=cache)
        if last_only:
            hidden = hidden[:, -1:]
        return self.ends.logits(hidden)
