"""Chat through the local daemon: it runs the swarm client; we send the conversation."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from volunteer.chat.conversation import Conversation
from volunteer.control.channel import ControlClient, DaemonNotRunningError
from volunteer.errors import VolunteerError
from volunteer.models.sampling import SamplingParams
from volunteer.paths import Paths

TOKEN_WAIT_S = 300.0
"""Longest wait for the next piece of a reply (the first one loads the model's ends)."""


class DaemonChat:
    """The `stream_reply` of local chat, answered by the daemon's `chat` method."""

    def __init__(self, paths: Paths, *, model: str | None = None) -> None:
        self._client = ControlClient(paths)
        self._model = model

    def stream_reply(
        self, conversation: Conversation, *, max_new_tokens: int, sampling: SamplingParams
    ) -> Iterator[str]:
        """Streams the assistant's next reply as text pieces; it does not record it.

        Raises:
            VolunteerError: no daemon runs, or it answered with an error.
        """
        params: dict[str, Any] = {
            "messages": conversation.for_template(),
            "max_new_tokens": max_new_tokens,
            "temperature": sampling.temperature,
            "top_k": sampling.top_k,
            "top_p": sampling.top_p,
            "repetition_penalty": sampling.repetition_penalty,
            "seed": sampling.seed,
            "model": self._model,
        }
        try:
            for message in self._client.call_stream("chat", params, timeout_s=TOKEN_WAIT_S):
                if "text" in message:  # the last message carries the reply's stats
                    yield message["text"]
        except DaemonNotRunningError:
            raise VolunteerError(
                "no daemon is running here: start one with `volunteer start` (or "
                "`volunteer start --join MULTIADDR`), chat through a swarm directly with "
                "`--swarm MULTIADDR`, or run the model here with `--local`"
            ) from None
