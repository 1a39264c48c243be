"""A chat conversation and the loop that streams a reply's text, wherever the model runs.

Local chat and swarm chat differ only in the step function they open (the whole model in
this process, or a session through the swarm); prompt encoding, context limits, stop
tokens and UTF-8-safe detokenizing are the same code, so their output is comparable.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

from volunteer.errors import SettingsError
from volunteer.models.errors import ContextLengthError
from volunteer.models.generation import StepFn, generate_tokens
from volunteer.models.sampling import Sampler, SamplingParams

if TYPE_CHECKING:  # the daemon imports this module; the tokenizer loads with a chat
    from volunteer.models.tokenizer import Tokenizer

OpenStepper = Callable[[int, int], AbstractContextManager[StepFn]]
"""(prompt_len, max_new_tokens) -> a step function for one reply, released at exit."""


@dataclasses.dataclass
class Conversation:
    """The messages of one multi-turn chat, oldest first."""

    system_prompt: str | None = None
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)
    raw_prompt: str | None = None
    """A prompt to continue as it is, with no chat template (a completion): the
    messages are then ignored."""

    def prompt_ids(self, tokenizer: Tokenizer) -> list[int]:
        """The prompt's tokens: the raw prompt's, else the messages' through the model's
        chat template."""
        if self.raw_prompt is not None:
            return tokenizer.encode(self.raw_prompt, add_special_tokens=True)
        return tokenizer.encode_chat(self.for_template())

    def for_template(self) -> list[dict[str, str]]:
        """Messages as a chat template expects them, the system prompt first."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages


@dataclasses.dataclass
class ReplyStats:
    """What one reply took: filled in while it streams (for the chat UI)."""

    tokens: int = 0
    """New tokens generated (the stop token not counted)."""
    prompt_tokens: int = 0
    """Tokens of the prompt the reply continued."""
    max_tokens: int = 0
    """The most it could have generated (the asked-for number, less what the context
    could not hold): a reply of this many tokens was cut short."""
    route: list[tuple[str, int, int]] = dataclasses.field(default_factory=list)
    """(peer id, start, end) of each server the blocks ran on; empty when local."""


def user_sampling(
    *,
    temperature: float,
    top_k: int,
    top_p: float,
    repetition_penalty: float,
    seed: int | None,
) -> SamplingParams:
    """Sampling settings a user gave (flags or a chat request); a bad one is a
    `SettingsError` that names it."""
    try:
        return SamplingParams(
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
        )
    except ValueError as exc:
        raise SettingsError(str(exc)) from exc


def stream_reply(
    tokenizer: Tokenizer,
    conversation: Conversation,
    *,
    context_length: int,
    max_new_tokens: int,
    sampling: SamplingParams,
    open_stepper: OpenStepper,
    should_stop: Callable[[], bool] = lambda: False,
    stats: ReplyStats | None = None,
) -> Iterator[str]:
    """Streams the assistant's next reply as text pieces; it does not record it.

    Args:
        context_length: the model's context; a reply that would run past it is cut short.
        should_stop: polled after each token; True ends the reply there.
        stats: counts the tokens as they come.

    Raises:
        ContextLengthError: the prompt alone fills the context.
    """
    prompt = conversation.prompt_ids(tokenizer)
    if len(prompt) >= context_length:
        raise ContextLengthError(
            f"the prompt has {len(prompt)} tokens but the model's context is {context_length}; "
            f"shorten it (or start a new conversation)"
        )
    max_new_tokens = min(max_new_tokens, context_length - len(prompt))
    if stats is not None:
        stats.prompt_tokens, stats.max_tokens = len(prompt), max_new_tokens
    decoder = tokenizer.stream_decoder()
    with open_stepper(len(prompt), max_new_tokens) as step:
        for token_id in generate_tokens(
            step,
            prompt,
            max_new_tokens=max_new_tokens,
            sampler=Sampler(sampling),
            stop_token_ids=tokenizer.stop_token_ids,
        ):
            if stats is not None:
                stats.tokens += 1
            if piece := decoder.push(token_id):
                yield piece
            if should_stop():
                return
    if tail := decoder.flush():
        yield tail
