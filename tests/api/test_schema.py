"""The requests the API accepts: OpenAI's fields checked and bounded, the ones this daemon
cannot honour refused by name, content given as parts joined."""

from __future__ import annotations

from typing import Any

import pydantic
import pytest

from volunteer.api.schema import Answer, ChatCompletionRequest, CompletionRequest

CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def test_a_plain_chat_request_takes_openais_defaults() -> None:
    asked = ChatCompletionRequest.model_validate({**CHAT, "user": "ignored", "top_k": 3})
    assert asked.temperature == 1.0 and asked.top_p == 1.0 and not asked.stream
    assert asked.stops == [] and not asked.include_usage
    assert asked.token_limit == 32768  # up to what the context leaves


def test_max_completion_tokens_wins_and_stop_may_be_a_string() -> None:
    asked = ChatCompletionRequest.model_validate(
        {**CHAT, "max_tokens": 50, "max_completion_tokens": 20, "stop": "\n"}
    )
    assert asked.token_limit == 20 and asked.stops == ["\n"]


def test_content_parts_are_joined_and_developer_is_system() -> None:
    asked = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
        }
    )
    assert [(m.plain_role(), m.text()) for m in asked.messages] == [
        ("system", "be brief"),
        ("user", "ab"),
    ]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function"}]}, "tools"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": 2.5}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
            "messages",
        ),
        ({"temperature": float("nan")}, "temperature"),
    ],
)
def test_what_cannot_be_honoured_is_refused_by_name(change: dict[str, Any], field: str) -> None:
    with pytest.raises(pydantic.ValidationError) as refused:
        ChatCompletionRequest.model_validate({**CHAT, **change})
    assert refused.value.errors()[0]["loc"][0] == field


def test_a_completion_takes_one_prompt_and_sixteen_tokens_by_default() -> None:
    asked = CompletionRequest.model_validate({"model": "m", "prompt": ["once"]})
    assert asked.text == "once" and asked.token_limit == 16
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": ["one", "two"]})
    with pytest.raises(pydantic.ValidationError):
        CompletionRequest.model_validate({"model": "m", "prompt": "x", "suffix": "y"})


def test_answers_have_openais_shape() -> None:
    chat = Answer(is_chat=True, model="m")
    whole = chat.whole("Paris.", "stop", 10, 3)
    assert whole["object"] == "chat.completion" and whole["id"].startswith("chatcmpl-")
    assert whole["choices"][0]["message"] == {"role": "assistant", "content": "Paris."}
    assert whole["usage"] == {"prompt_tokens": 10, "completion_tokens": 3, "total_tokens": 13}
    assert chat.chunk("", first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chat.chunk(None, "length")["choices"][0] == {
        "index": 0,
        "finish_reason": "length",
        "delta": {},
    }
    text = Answer(is_chat=False, model="m")
    assert text.chunk("x")["object"] == "text_completion"
    assert text.usage_chunk(1, 2)["choices"] == []
