"""Chat with a whole model running in this process: the reference the swarm must match."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import torch

from models.checkpoint import load_causal_lm
from models.generation import LocalStepper, generate_tokens
from models.model import CausalLM
from models.sampling import Sampler, SamplingParams
from models.tokenizer import Tokenizer


@dataclasses.dataclass
class Conversation:
    """The messages of one multi-turn chat, oldest first."""

    system_prompt: str | None = None
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def for_template(self) -> list[dict[str, str]]:
        """Messages as a chat template expects them, the system prompt first."""
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return system + self.messages


class LocalChat:
    """A tokenizer and a whole model in this process, answering conversations."""

    def __init__(self, model: CausalLM, tokenizer: Tokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer

    @classmethod
    def load(cls, folder: Path, *, dtype: torch.dtype = torch.float32) -> LocalChat:
        """Loads the model and tokenizer of a Hugging Face-format folder."""
        return cls(load_causal_lm(folder, dtype=dtype), Tokenizer.from_folder(folder))

    def stream_reply(
        self,
        conversation: Conversation,
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> Iterator[str]:
        """Streams the assistant's next reply as text pieces; it does not record it."""
        prompt = self.tokenizer.encode_chat(conversation.for_template())
        # A reply that would run past the model's context is cut short; a prompt that
        # does not fit at all raises ContextLengthError from the stepper.
        max_new_tokens = min(max_new_tokens, self.model.span.rotary.max_positions - len(prompt))
        stepper = LocalStepper.for_generation(
            self.model, prompt_len=len(prompt), max_new_tokens=max_new_tokens
        )
        decoder = self.tokenizer.stream_decoder()
        for token_id in generate_tokens(
            stepper,
            prompt,
            max_new_tokens=max_new_tokens,
            sampler=Sampler(sampling),
            stop_token_ids=self.tokenizer.stop_token_ids,
        ):
            if piece := decoder.push(token_id):
                yield piece
        if tail := decoder.flush():
            yield tail
