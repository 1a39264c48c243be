"""Messages from the app's workers to its widgets: results of daemon I/O, in small pieces."""

from __future__ import annotations

from textual.message import Message
from volunteer.tui.gauges import Gauges

from volunteer.chat.store import ConversationSummary, StoredConversation
from volunteer.control.messages import (
    AdaptersReply,
    ChatStats,
    FinetuneJob,
    LeaderboardReply,
    PeersReply,
    StatusReply,
    SwarmReply,
)


class StatusUpdated(Message):
    """A status poll's answer: the status, or None when no daemon runs (or it failed)."""

    def __init__(self, status: StatusReply | None, error: str | None = None) -> None:
        super().__init__()
        self.status = status
        self.error = error


class SwarmUpdated(Message):
    def __init__(
        self,
        swarm: SwarmReply | None,
        error: str | None = None,
        peers: PeersReply | None = None,
    ) -> None:
        super().__init__()
        self.swarm = swarm
        self.error = error
        self.peers = peers


class LeaderboardUpdated(Message):
    """A leaderboard poll's answer: the board, or None (no daemon, or `error`)."""

    def __init__(self, board: LeaderboardReply | None, error: str | None = None) -> None:
        super().__init__()
        self.board = board
        self.error = error


class FinetuneUpdated(Message):
    """The daemon's fine-tuning job as a poll, a start or a stop found it; or None with
    `error` (no daemon, or the daemon refused a start: shown, the last job kept)."""

    def __init__(self, job: FinetuneJob | None, error: str | None = None) -> None:
        super().__init__()
        self.job = job
        self.error = error


class FinetuneRefused(Message):
    """The daemon refused a start or stop from the finetune tab: what it said."""

    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class AdaptersListed(Message):
    """The daemon's adapters (None: it did not say, `error` why)."""

    def __init__(self, reply: AdaptersReply | None, error: str | None = None) -> None:
        super().__init__()
        self.reply = reply
        self.error = error


class ChatWithAdapter(Message):
    """The finetune tab asks for the chat tab, with this adapter selected."""

    def __init__(self, adapter: str) -> None:
        super().__init__()
        self.adapter = adapter


class GaugesUpdated(Message):
    def __init__(self, gauges: Gauges) -> None:
        super().__init__()
        self.gauges = gauges


class ChatPiece(Message):
    def __init__(self, text: str, reply_id: int) -> None:
        super().__init__()
        self.text = text
        self.reply_id = reply_id


class ChatDone(Message):
    """The reply ended: its stats (tokens, seconds, route), or what went wrong."""

    def __init__(
        self,
        stats: ChatStats | None,
        reply_id: int,
        *,
        error: str | None = None,
        stopped: bool = False,
    ) -> None:
        super().__init__()
        self.stats = stats
        self.reply_id = reply_id
        self.error = error
        self.stopped = stopped


class LogLines(Message):
    def __init__(self, lines: list[str]) -> None:
        super().__init__()
        self.lines = lines


class DaemonActionDone(Message):
    """A start or stop from the dashboard finished; `said` is what it reported."""

    def __init__(self, said: str) -> None:
        super().__init__()
        self.said = said


class ConfigLoaded(Message):
    def __init__(self, values: dict[str, str], error: str | None = None) -> None:
        super().__init__()
        self.values = values
        self.error = error


class HistoryListed(Message):
    """The saved chats, newest first (None with `error` when the store failed)."""

    def __init__(
        self, summaries: list[ConversationSummary] | None, error: str | None = None
    ) -> None:
        super().__init__()
        self.summaries = summaries
        self.error = error


class ConversationOpened(Message):
    def __init__(self, conversation: StoredConversation) -> None:
        super().__init__()
        self.conversation = conversation
