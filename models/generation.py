"""The autoregressive loop, independent of where the blocks run.

`generate_tokens` drives any `StepFn` — the whole model in this process (`LocalStepper`)
or, later, a chain of remote spans — so the swarm and local chat share one loop and one
sampler, and greedy output through the swarm can equal local output token for token.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Protocol

import torch
from volunteer.models.errors import ContextLengthError
from volunteer.models.kv_cache import KVCache, KVFormat
from volunteer.models.model import CausalLM
from volunteer.models.sampling import Sampler


class StepFn(Protocol):
    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Feeds tokens [B, S] at positions [start_pos, start_pos + S); returns the
        logits [B, vocab] for the position after the last one."""
        ...


def generate_tokens(
    step: StepFn,
    prompt_ids: Sequence[int],
    *,
    max_new_tokens: int,
    sampler: Sampler,
    stop_token_ids: frozenset[int] = frozenset(),
) -> Iterator[int]:
    """Yields new token ids one at a time until a stop token or `max_new_tokens`.

    The stop token itself is not yielded.
    """
    if not prompt_ids:
        raise ValueError("the prompt must hold at least one token")
    prompt_len = len(prompt_ids)
    context = torch.empty(1, prompt_len + max_new_tokens, dtype=torch.long)
    context[0, :prompt_len] = torch.tensor(list(prompt_ids), dtype=torch.long)
    logits = step(context[:, :prompt_len], 0)
    for produced in range(max_new_tokens):
        pos = prompt_len + produced
        token = sampler(logits, context[:, :pos])
        token_id = int(token[0])
        if token_id in stop_token_ids:
            return
        yield token_id
        context[0, pos] = token_id
        if produced + 1 < max_new_tokens:
            logits = step(context[:, pos : pos + 1], pos)


class LocalStepper:
    """Runs the whole model in this process with a KV cache sized for one generation."""

    def __init__(self, model: CausalLM, cache: KVCache) -> None:
        self.model = model
        self.cache = cache

    @classmethod
    def for_generation(
        cls,
        model: CausalLM,
        *,
        prompt_len: int,
        max_new_tokens: int,
        kv_format: KVFormat = "float",
    ) -> LocalStepper:
        """A stepper whose cache (held as `kv_format` says) holds the prompt and every new
        token (within the context)."""
        limit = model.span.rotary.max_positions
        if prompt_len >= limit:
            raise ContextLengthError(
                f"the prompt has {prompt_len} tokens but the model's context is {limit}; "
                f"shorten it (or start a new conversation)"
            )
        length = min(prompt_len + max_new_tokens, limit)
        cache = model.span.allocate_cache(batch_size=1, max_length=length, kv_format=kv_format)
        return cls(model, cache)

    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        self.cache.check_room(start_pos, input_ids.shape[1])
        with torch.inference_mode():
            logits = self.model(input_ids, start_pos=start_pos, cache=self.cache, last_only=True)
        self.cache.length = start_pos + input_ids.shape[1]
        return logits[:, -1]
