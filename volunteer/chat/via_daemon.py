"""Chat through the local daemon: it runs the swarm client; we send the conversation."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pydantic

from volunteer.chat.conversation import Conversation
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import DaemonNotRunningError
from volunteer.control.messages import (
    CHAT,
    ChatMessage,
    ChatNotice,
    ChatRequest,
    ChatText,
    first_problem,
)
from volunteer.errors import SettingsError, VolunteerError
from volunteer.models.sampling import SamplingParams
from volunteer.paths import Paths

TOKEN_WAIT_S = 300.0
"""Longest wait for the next piece of a reply (the first one loads the model's ends)."""


class DaemonChat:
    """The `stream_reply` of local chat, answered by the daemon's `chat` method."""

    def __init__(
        self,
        paths: Paths,
        *,
        model: str | None = None,
        verify: str | None = None,
        notify: Callable[[str], None] | None = None,
        adapter: str | None = None,
    ) -> None:
        """`adapter`: answer with this adapter of the daemon's (None: the base model)."""
        self._client = ControlClient(paths)
        self._model = model
        self._verify = verify
        self._adapter = adapter
        self._notify = notify
        """Told the daemon's notices (the blocks a reply waits for); None: dropped."""

    def stream_reply(
        self, conversation: Conversation, *, max_new_tokens: int, sampling: SamplingParams
    ) -> Iterator[str]:
        """Streams the assistant's next reply as text pieces; it does not record it.

        Raises:
            VolunteerError: no daemon runs, or it answered with an error.
        """
        try:
            request = ChatRequest(
                messages=[ChatMessage.model_validate(m) for m in conversation.for_template()],
                max_new_tokens=max_new_tokens,
                temperature=sampling.temperature,
                top_k=sampling.top_k,
                top_p=sampling.top_p,
                repetition_penalty=sampling.repetition_penalty,
                seed=sampling.seed,
                model=self._model,
                verify=self._verify,
                adapter=self._adapter,
            )
        except pydantic.ValidationError as exc:
            raise SettingsError(f"bad chat request: {first_problem(exc)}") from None
        try:
            for message in self._client.call_stream(CHAT, request, timeout_s=TOKEN_WAIT_S):
                if isinstance(message, ChatText):  # the last message: the reply's stats
                    yield message.text
                elif isinstance(message, ChatNotice) and self._notify is not None:
                    self._notify(message.notice)
        except DaemonNotRunningError:
            raise VolunteerError(
                "no daemon is running here: start one with `volunteer start` (or "
                "`volunteer start --join MULTIADDR`), chat through a swarm directly with "
                "`--swarm MULTIADDR`, or run the model here with `--local`"
            ) from None
