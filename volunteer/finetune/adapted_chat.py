"""Chat with a trained adapter: in this process, or through the swarm.

In this process the adapter rides along a KV-cached generation like any chat. Through the
swarm, servers keep no adapter between calls (they apply what each call carries), so a
reply runs its whole context through forward calls for each new token: servers hold no
client state, at the price of recomputing the context per token, which suits the short
answers adapters are usually tested with.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

from volunteer.chat.conversation import Conversation, ReplyStats, stream_reply
from volunteer.finetune.adapter_info import AdapterInfo, check_compatible
from volunteer.finetune.blocks import Blocks
from volunteer.finetune.params import AdapterParams, MethodSettings
from volunteer.finetune.store import AdapterStore
from volunteer.models.adapters import SpanAdapter
from volunteer.models.config import ModelConfig
from volunteer.models.errors import ContextLengthError
from volunteer.models.generation import StepFn
from volunteer.models.kv_cache import KVCache
from volunteer.models.model import BlockSpan, ModelEnds
from volunteer.models.sampling import SamplingParams
from volunteer.models.tokenizer import Tokenizer


@dataclasses.dataclass(frozen=True)
class LoadedAdapter:
    """A stored adapter, ready to apply: its soft prompt and what the blocks apply."""

    info: AdapterInfo
    prompt: torch.Tensor | None
    adapter: SpanAdapter | None

    @property
    def prefix_len(self) -> int:
        return 0 if self.prompt is None else self.prompt.shape[0]


def load_adapter(
    store: AdapterStore, name: str, *, config: ModelConfig, model: str
) -> LoadedAdapter:
    """The adapter `name`, checked against the model it is to run on.

    Raises:
        AdapterError: missing, damaged, or trained for another model.
    """
    info, tensors = store.load(name, config=config)
    check_compatible(info, config, model)
    targets = info.targets or MethodSettings().targets
    settings = MethodSettings(
        info.method,
        prompt_len=max(info.prompt_len, 1),
        rank=max(info.rank, 1),
        alpha=info.alpha or 1.0,
        targets=targets,
    )
    params = AdapterParams(settings, config, embed_std=1.0).requires_grad_(False)
    params.load_named(tensors)
    return LoadedAdapter(info, params.prompt, params.span_adapter())


class AdaptedChat:
    """A chat whose every reply runs with one adapter (`stream_reply` as other chats)."""

    def __init__(
        self,
        *,
        tokenizer: Tokenizer,
        config: ModelConfig,
        loaded: LoadedAdapter,
        open_stepper: Callable[[int, int], contextlib.AbstractContextManager[StepFn]],
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config
        self.loaded = loaded
        self._open_stepper = open_stepper

    def stream_reply(
        self,
        conversation: Conversation,
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
        should_stop: Callable[[], bool] = lambda: False,
        stats: ReplyStats | None = None,
        **_: Any,
    ) -> Iterator[str]:
        """Streams the assistant's next reply as text pieces; it does not record it."""
        yield from stream_reply(
            self.tokenizer,
            conversation,
            # The soft prompt takes positions of the model's context.
            context_length=self.config.max_position_embeddings - self.loaded.prefix_len,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            open_stepper=self._open_stepper,
            should_stop=should_stop,
            stats=stats,
        )


def local_chat(
    ends: ModelEnds, span: BlockSpan, tokenizer: Tokenizer, loaded: LoadedAdapter
) -> AdaptedChat:
    """The whole model in this process, with a KV cache."""
    config = span.config

    @contextlib.contextmanager
    def open_stepper(prompt_len: int, new_tokens: int) -> Iterator[StepFn]:
        length = loaded.prefix_len + prompt_len + new_tokens
        if length > span.rotary.max_positions:
            raise ContextLengthError(f"{length} positions exceed the context")
        cache = span.allocate_cache(batch_size=1, max_length=length)
        yield _CachedStepper(ends, span, cache, loaded)

    return AdaptedChat(tokenizer=tokenizer, config=config, loaded=loaded, open_stepper=open_stepper)


def swarm_chat(
    ends: ModelEnds,
    blocks: Blocks,
    tokenizer: Tokenizer,
    config: ModelConfig,
    loaded: LoadedAdapter,
) -> AdaptedChat:
    """Every block in the swarm, the context recomputed per token (see the module)."""

    @contextlib.contextmanager
    def open_stepper(prompt_len: int, new_tokens: int) -> Iterator[StepFn]:
        yield _RecomputingStepper(ends, blocks, loaded)

    return AdaptedChat(tokenizer=tokenizer, config=config, loaded=loaded, open_stepper=open_stepper)


def _with_prompt(
    ends: ModelEnds, input_ids: torch.Tensor, prompt: torch.Tensor | None
) -> torch.Tensor:
    hidden = ends.embed(input_ids)
    if prompt is None:
        return hidden
    return torch.cat([prompt.unsqueeze(0).to(hidden), hidden], dim=1)


class _CachedStepper:
    def __init__(
        self, ends: ModelEnds, span: BlockSpan, cache: KVCache, loaded: LoadedAdapter
    ) -> None:
        self.ends, self.span, self.cache, self.loaded = ends, span, cache, loaded

    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        with torch.inference_mode():
            if start_pos == 0:
                hidden = _with_prompt(self.ends, input_ids, self.loaded.prompt)
                position = 0
            else:
                hidden = self.ends.embed(input_ids)
                position = start_pos + self.loaded.prefix_len
            self.cache.check_room(position, hidden.shape[1])
            output = self.span(
                hidden, start_pos=position, cache=self.cache, adapter=self.loaded.adapter
            )
            self.cache.length = position + hidden.shape[1]
            return self.ends.logits(output[:, -1:])[:, -1]


class _RecomputingStepper:
    def __init__(self, ends: ModelEnds, blocks: Blocks, loaded: LoadedAdapter) -> None:
        self.ends, self.blocks, self.loaded = ends, blocks, loaded
        self.context = torch.empty(1, 0, dtype=torch.long)

    def __call__(self, input_ids: torch.Tensor, start_pos: int) -> torch.Tensor:
        self.context = torch.cat([self.context[:, :start_pos], input_ids], dim=1)
        with torch.no_grad():
            hidden = _with_prompt(self.ends, self.context, self.loaded.prompt)
            output = self.blocks(hidden, self.loaded.adapter)
            return self.ends.logits(output[:, -1:])[:, -1]
