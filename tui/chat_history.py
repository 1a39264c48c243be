"""The chat screen's memory: each conversation saved as it goes (`volunteer.chat.store`),
listed and reopened. All calls block on SQLite briefly; the chat screen makes them from
its worker threads."""

from __future__ import annotations

import threading
import time
from typing import Any

from volunteer.chat.store import (
    ChatStore,
    ConversationSummary,
    StoredConversation,
    StoredMessage,
    title_from,
)
from volunteer.control.messages import ChatStats

LIST_LIMIT = 50


class ChatHistory:
    """The conversation being written (created with its first question) in a store."""

    def __init__(self, store: ChatStore) -> None:
        self.store = store
        self.conversation_id: int | None = None
        self._lock = threading.Lock()

    def record_question(self, text: str, system: str | None, settings: dict[str, Any]) -> None:
        with self._lock:
            if self.conversation_id is None:
                self.conversation_id = self.store.create(title_from(text), system, settings)
            else:
                self.store.update_settings(self.conversation_id, system, settings)
            question = StoredMessage(role="user", content=text, created_at_s=time.time())
            self.store.append(self.conversation_id, question)

    def record_answer(self, text: str, stats: ChatStats | None) -> None:
        with self._lock:
            if self.conversation_id is None:
                return
            route = () if stats is None else tuple((h.peer_id, h.start, h.end) for h in stats.route)
            message = StoredMessage(
                role="assistant",
                content=text,
                created_at_s=time.time(),
                tokens=None if stats is None else stats.tokens,
                seconds=None if stats is None else stats.seconds,
                route=route,
            )
            self.store.append(self.conversation_id, message)

    def start_new(self) -> None:
        with self._lock:
            self.conversation_id = None

    def open(self, conversation_id: int) -> StoredConversation:
        conversation = self.store.load(conversation_id)
        with self._lock:
            self.conversation_id = conversation_id
        return conversation

    def summaries(self) -> list[ConversationSummary]:
        return self.store.list(LIST_LIMIT)
