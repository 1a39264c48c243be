"""What the endpoint accepts, as OpenAI's API defines it, checked and bounded; and the JSON
of its answers.

Fields this daemon cannot honour (`n` > 1, tools, logprobs, images) are refused by name
rather than ignored; fields that change nothing here (`user`, `presence_penalty` of 0...)
are ignored, as OpenAI-compatible servers do.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

import pydantic

from volunteer.control.messages import MAX_MESSAGES, MAX_NEW_TOKENS, MAX_STOPS, StopText

MAX_TEXT_CHARS = 1 << 20
"""The longest message or prompt, in characters (the context bounds it far below)."""

Text = Annotated[str, pydantic.StringConstraints(max_length=MAX_TEXT_CHARS)]


class TextPart(pydantic.BaseModel):
    type: Literal["text"]
    text: Text


class Message(pydantic.BaseModel):
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | Annotated[list[TextPart], pydantic.Field(max_length=MAX_MESSAGES)] | None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def plain_role(self) -> str:
        return "system" if self.role == "developer" else self.role


class StreamOptions(pydantic.BaseModel):
    include_usage: bool = False


class _Generation(pydantic.BaseModel):
    """The options chat and completions share."""

    model_config = pydantic.ConfigDict(extra="ignore", allow_inf_nan=False)

    model: Annotated[str, pydantic.StringConstraints(min_length=1, max_length=256)]
    temperature: Annotated[float, pydantic.Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, pydantic.Field(gt=0, le=1)] = 1.0
    seed: int | None = None
    stop: StopText | Annotated[list[StopText], pydantic.Field(max_length=MAX_STOPS)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, pydantic.Field(ge=1, le=1)] = 1
    logprobs: Literal[False, None] = None

    @property
    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Generation):
    messages: Annotated[list[Message], pydantic.Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    max_completion_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_NEW_TOKENS)] | None = None
    tools: Annotated[list[Any], pydantic.Field(max_length=0)] | None = None

    @property
    def token_limit(self) -> int:
        """The most new tokens (up to the context's room when none is given)."""
        return self.max_completion_tokens or self.max_tokens or MAX_NEW_TOKENS


class CompletionRequest(_Generation):
    prompt: Text | Annotated[list[Text], pydantic.Field(min_length=1, max_length=1)]
    max_tokens: Annotated[int, pydantic.Field(ge=1, le=MAX_NEW_TOKENS)] = 16
    """OpenAI's default for completions."""
    echo: bool = False
    suffix: Literal[None] = None

    @property
    def token_limit(self) -> int:
        return self.max_tokens

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


def completion_id(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


class Answer:
    """The JSON objects of one answer (whole, or as stream chunks), chat or completion."""

    def __init__(self, *, is_chat: bool, model: str) -> None:
        self.is_chat = is_chat
        self.model = model
        self.id = completion_id("chatcmpl" if is_chat else "cmpl")
        self.created = int(time.time())
        self.object = "chat.completion" if is_chat else "text_completion"

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, finish: str, prompt_tokens: int, tokens: int) -> dict[str, Any]:
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.is_chat:
            choice["message"] = {"role": "assistant", "content": text}
        else:
            choice |= {"text": text, "logprobs": None}
        return {
            **self._head(self.object),
            "choices": [choice],
            "usage": usage(prompt_tokens, tokens),
        }

    def chunk(self, text: str | None, finish: str | None = None, *, first: bool = False) -> dict:
        """A streamed piece of text (None: no text, as in the last chunk)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.is_chat:
            delta: dict[str, str] = {"role": "assistant"} if first else {}
            if text is not None:
                delta["content"] = text
            choice["delta"] = delta
            return {**self._head("chat.completion.chunk"), "choices": [choice]}
        choice |= {"text": text or "", "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, tokens: int) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.is_chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": usage(prompt_tokens, tokens)}
