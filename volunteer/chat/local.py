"""Chat with a whole model running in this process: the reference the swarm must match."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import torch

from volunteer.chat.conversation import Conversation, stream_reply
from volunteer.models.checkpoint import load_causal_lm
from volunteer.models.generation import LocalStepper
from volunteer.models.kv_cache import KVFormat
from volunteer.models.model import CausalLM
from volunteer.models.sampling import SamplingParams
from volunteer.models.tokenizer import Tokenizer
from volunteer.models.weight_format import WeightFormat

__all__ = ["Conversation", "LocalChat"]


class LocalChat:
    """A tokenizer and a whole model in this process, answering conversations."""

    def __init__(
        self, model: CausalLM, tokenizer: Tokenizer, *, kv_format: KVFormat = "float"
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.kv_format: KVFormat = kv_format
        """How the attention cache holds keys and values ("q4": FlexGen's 4 bits)."""

    @classmethod
    def load(
        cls,
        folder: Path,
        *,
        dtype: torch.dtype = torch.float32,
        fmt: WeightFormat | None = None,
    ) -> LocalChat:
        """Loads the model and tokenizer of a Hugging Face-format folder (its weights in
        `fmt` if given, which then sets the dtype)."""
        model = load_causal_lm(folder, dtype=dtype, fmt=fmt)
        return cls(model, Tokenizer.from_folder(folder))

    def stream_reply(
        self,
        conversation: Conversation,
        *,
        max_new_tokens: int,
        sampling: SamplingParams,
    ) -> Iterator[str]:
        """Streams the assistant's next reply as text pieces; it does not record it."""

        def open_stepper(prompt_len: int, new_tokens: int) -> contextlib.nullcontext[LocalStepper]:
            return contextlib.nullcontext(
                LocalStepper.for_generation(
                    self.model,
                    prompt_len=prompt_len,
                    max_new_tokens=new_tokens,
                    kv_format=self.kv_format,
                )
            )

        return stream_reply(
            self.tokenizer,
            conversation,
            context_length=self.model.span.rotary.max_positions,
            max_new_tokens=max_new_tokens,
            sampling=sampling,
            open_stepper=open_stepper,
        )
