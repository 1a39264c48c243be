"""What `volunteer chat` prints of a reply: the model's text, never terminal control."""

from __future__ import annotations

import argparse
import io
from collections.abc import Iterator
from typing import Any

from volunteer.models.sampling import SamplingParams

from volunteer.chat.conversation import Conversation
from volunteer.commands.chat import _answer


class _Pieces:
    """A chat whose model answers with the given pieces (a model's weights are its
    publisher's: its text may carry anything)."""

    def __init__(self, *pieces: str) -> None:
        self.pieces = pieces

    def stream_reply(self, conversation: Conversation, **_: Any) -> Iterator[str]:
        yield from self.pieces


def test_control_characters_of_a_reply_are_not_printed() -> None:
    out = io.StringIO()
    chat = _Pieces("Paris\x1b[2J", "\u202e is\tthe", " capital\x07.\n", "Next line")
    conversation = Conversation(system_prompt=None)
    args = argparse.Namespace(max_new_tokens=8)
    _answer(chat, conversation, "Capital?", args, SamplingParams(), out)  # type: ignore[arg-type]
    assert out.getvalue() == "Paris[2J is\tthe capital.\nNext line\n"
    # The conversation keeps what the model said, as it said it.
    assert conversation.messages[-1]["content"].startswith("Paris\x1b[2J")
