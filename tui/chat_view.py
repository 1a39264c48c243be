"""Chat with the swarm's model through the daemon: streaming answers rendered as
Markdown, a stop key, a new-conversation key, sampling settings and a fine-tuned adapter
to answer with in a side panel, and each answer's route and speed.

While a reply streams it is shown as plain text, redrawn at most PAINT_PERIOD_S apart;
when it ends it is rendered as Markdown. (Re-parsing Markdown for every token kept the
event loop so busy that a keypress took half a second to show.)"""

from __future__ import annotations

import threading
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.widgets import Input, Label, ListItem, ListView, Markdown, Select, Static
from volunteer.tui.chat_history import ChatHistory
from volunteer.tui.messages import ChatDone, ChatPiece, ConversationOpened, HistoryListed
from volunteer.tui.render import route_text

from volunteer.control.messages import AdapterRow, ChatNotice, ChatStats, ChatText

DEFAULT_MAX_TOKENS = 256
PAINT_PERIOD_S = 0.1


class ChatView(Horizontal):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "stop_reply", "Stop reply"),
        Binding("ctrl+n", "new_chat", "New chat"),
    ]

    def __init__(self, history: ChatHistory | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.history = history
        """Where conversations are saved (None: not saved, e.g. no data dir)."""
        self.messages: list[dict[str, str]] = []
        self.is_streaming = False
        self._stop = threading.Event()
        self._reply: list[str] = []
        self._answer: Static | None = None
        self._is_dirty = False
        self._stats: Static | None = None
        self._adapters: set[str] = set()
        self._reply_id = 0
        """Which reply the pieces arriving now belong to: a reply cut off by a new
        conversation may still send a few, which are dropped."""

    def compose(self) -> ComposeResult:
        with Vertical(id="chat-main"):
            yield VerticalScroll(id="messages")
            yield Input(placeholder="Ask the swarm… (Enter sends)", id="prompt")
        with Vertical(id="chat-side"):
            yield Label("System prompt")
            yield Input(placeholder="(none)", id="system")
            yield Label("Temperature (0: greedy)")
            yield Input("0", id="temperature", type="number")
            yield Label("Top-p")
            yield Input("1.0", id="top-p", type="number")
            yield Label("Max new tokens")
            yield Input(str(DEFAULT_MAX_TOKENS), id="max-tokens", type="integer")
            yield Label("Adapter")
            yield Select([], prompt="none: the base model", id="adapter")
            yield Static(id="chat-note", markup=False)
            yield Label("Saved chats (Enter opens)")
            yield ListView(id="history")

    def sampling(self) -> dict[str, Any]:
        """The side panel's settings as chat request fields (the daemon validates them)."""

        def number(widget_id: str, cast: type, default: Any) -> Any:
            text = self.query_one(f"#{widget_id}", Input).value.strip()
            try:
                return cast(text) if text else default
            except ValueError:
                return default

        settings = {
            "temperature": number("temperature", float, 0.0),
            "top_p": number("top-p", float, 1.0),
            "max_new_tokens": number("max-tokens", int, DEFAULT_MAX_TOKENS),
        }
        adapter = self.query_one("#adapter", Select)
        if not adapter.is_blank():
            settings["adapter"] = adapter.value
        return settings

    def show_adapters(self, rows: list[AdapterRow]) -> None:
        """The adapters to choose from (damaged ones left out); the choice stays while
        its adapter does."""
        self._list_adapters({row.name for row in rows if not row.is_broken})

    def select_adapter(self, name: str) -> None:
        """Selects adapter `name` (listed at once, before the daemon's list says so)."""
        self._list_adapters(self._adapters | {name})
        self.query_one("#adapter", Select).value = name

    def _list_adapters(self, names: set[str]) -> None:
        if names == self._adapters:  # listed every time the tab shows: the choice stays
            return
        select = self.query_one("#adapter", Select)
        chosen = None if select.is_blank() else select.value
        self._adapters = names
        select.set_options((name, name) for name in sorted(names))
        if chosen in names:
            select.value = chosen

    @on(Input.Submitted, "#prompt")
    async def submit(self, event: Input.Submitted) -> None:
        text = event.value.strip()
        if not text or self.is_streaming:
            return
        event.input.value = ""
        self.messages.append({"role": "user", "content": text})
        log = self.query_one("#messages", VerticalScroll)
        await log.mount(Static(f"› {text}", classes="user", markup=False))
        # markup=False on every text that comes from people, models or peers: Textual
        # would read "[/]" as markup and fail, or "[@click=...]" as an action.
        self._answer = Static("", classes="assistant streaming", markup=False)
        self._stats = Static("…", classes="stats", markup=False)
        await log.mount(self._answer, self._stats)
        log.anchor()
        self._reply = []
        self._stop = threading.Event()
        self._reply_id += 1
        self.is_streaming = True
        system = self.query_one("#system", Input).value.strip()
        messages = ([{"role": "system", "content": system}] if system else []) + self.messages
        self.ask(dict(self.sampling(), messages=messages), self._reply_id, self._stop)

    @work(thread=True, group="chat")
    def ask(self, params: dict[str, Any], reply_id: int, stop: threading.Event) -> None:
        stats: ChatStats | None = None
        question = params["messages"][-1]["content"]
        system = next((m["content"] for m in params["messages"] if m["role"] == "system"), None)
        settings = {k: v for k, v in params.items() if k != "messages"}
        self._save(lambda h: h.record_question(question, system, settings))
        stream = self.app.client.chat(params)  # type: ignore[attr-defined]
        try:
            for message in stream:
                if isinstance(message, ChatText):
                    self.post_message(ChatPiece(message.text, reply_id))
                elif isinstance(message, ChatNotice):  # e.g. waiting for a hole's repair
                    self.app.call_from_thread(self.notify, message.notice, timeout=10)
                else:
                    stats = message
                if stop.is_set():
                    break
        except Exception as exc:  # any failure ends this reply; the app goes on
            error = str(exc) or type(exc).__name__
            self.post_message(ChatDone(None, reply_id, error=error))
            return
        finally:
            # A stopped reply: closing the stream tells the daemon to stop generating.
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        self.post_message(ChatDone(stats, reply_id, stopped=stop.is_set()))

    def _save(self, action: Any) -> None:
        """Runs `action(history)` (on a worker thread), then lists the saved chats again;
        a store that fails is reported under the settings and the chat goes on."""
        if self.history is None:
            return
        try:
            action(self.history)
            self.post_message(HistoryListed(self.history.summaries()))
        except Exception as exc:
            self.post_message(HistoryListed(None, error=f"not saved: {exc}"))

    @work(thread=True, group="chat-save")
    def save_answer(self, text: str, stats: ChatStats | None) -> None:
        self._save(lambda h: h.record_answer(text, stats))

    @work(thread=True, exclusive=True, group="chat-list")
    def list_history(self) -> None:
        self._save(lambda h: None)

    async def on_history_listed(self, message: HistoryListed) -> None:
        note = self.query_one("#chat-note", Static)
        if message.error is not None:
            note.update(message.error)
            return
        listing = self.query_one("#history", ListView)
        index = listing.index
        await listing.clear()
        items = [
            ListItem(Label(s.title, markup=False), id=f"chat-{s.id}")
            for s in message.summaries or []
        ]
        await listing.extend(items)
        if index is not None and items:
            listing.index = min(index, len(items) - 1)

    @on(ListView.Selected, "#history")
    def open_selected(self, event: ListView.Selected) -> None:
        if self.is_streaming or event.item.id is None or self.history is None:
            return
        self.open_conversation(int(event.item.id.removeprefix("chat-")))

    @work(thread=True, exclusive=True, group="chat-list")
    def open_conversation(self, conversation_id: int) -> None:
        assert self.history is not None
        try:
            self.post_message(ConversationOpened(self.history.open(conversation_id)))
        except Exception as exc:
            self.post_message(HistoryListed(None, error=f"cannot open: {exc}"))

    async def on_conversation_opened(self, message: ConversationOpened) -> None:
        conversation = message.conversation
        await self._clear()
        log = self.query_one("#messages", VerticalScroll)
        for stored in conversation.messages:
            self.messages.append({"role": stored.role, "content": stored.content})
            if stored.role == "user":
                await log.mount(Static(f"› {stored.content}", classes="user", markup=False))
            else:
                await log.mount(Markdown(stored.content, classes="assistant"))
                if stored.tokens and stored.seconds:
                    speed = f"{stored.tokens} tokens, {stored.tokens / stored.seconds:.1f} tokens/s"
                    await log.mount(Static(f"saved · {speed}", classes="stats"))
        self.query_one("#system", Input).value = conversation.system_prompt or ""
        for key, widget_id in (("temperature", "temperature"), ("top_p", "top-p")):
            if key in conversation.settings:
                self.query_one(f"#{widget_id}", Input).value = str(conversation.settings[key])
        if "max_new_tokens" in conversation.settings:
            value = str(conversation.settings["max_new_tokens"])
            self.query_one("#max-tokens", Input).value = value
        adapter = conversation.settings.get("adapter")
        if isinstance(adapter, str) and adapter:
            self.select_adapter(adapter)
        else:
            self.query_one("#adapter", Select).clear()
        self.query_one("#chat-note", Static).update(f"reopened: {conversation.title}")
        log.scroll_end(animate=False)

    async def on_chat_piece(self, message: ChatPiece) -> None:
        if message.reply_id != self._reply_id:
            return
        self._reply.append(message.text)
        self._is_dirty = True

    def on_mount(self) -> None:
        self.set_interval(PAINT_PERIOD_S, self._paint)
        self.list_history()

    def _paint(self) -> None:
        if self._is_dirty and self._answer is not None:
            self._answer.update("".join(self._reply))
            self._is_dirty = False

    async def on_chat_done(self, message: ChatDone) -> None:
        if message.reply_id != self._reply_id:
            return
        # Everything the reply changes is set before the first await below, so nothing
        # sees a half-finished reply.
        self.is_streaming = False
        self._is_dirty = False
        reply = "".join(self._reply)
        if self._stats is not None:
            self._stats.update(_stats_line(message))
            self._stats.set_class(message.error is not None, "error")
        if reply:
            self.messages.append({"role": "assistant", "content": reply})
            self.save_answer(reply, message.stats)
        if self._answer is not None:
            streamed, self._answer = self._answer, None
            if reply:
                log = self.query_one("#messages", VerticalScroll)
                await log.mount(Markdown(reply, classes="assistant"), before=streamed)
            await streamed.remove()

    def action_stop_reply(self) -> None:
        if self.is_streaming:
            self._stop.set()

    async def action_new_chat(self) -> None:
        await self._clear()
        if self.history is not None:
            self.history.start_new()
        self.query_one("#chat-note", Static).update("new conversation")
        self.query_one("#prompt", Input).focus()

    async def _clear(self) -> None:
        self._stop.set()
        self._reply_id += 1  # whatever the old reply still sends is dropped
        self.is_streaming = False
        self._answer = None
        self._stats = None
        self.messages = []
        await self.query_one("#messages", VerticalScroll).remove_children()


def _stats_line(message: ChatDone) -> str:
    if message.error is not None:
        return f"failed: {message.error}"
    stats = message.stats
    parts = ["stopped" if message.stopped else "done"]
    if stats is not None and stats.seconds:
        parts.append(f"{stats.tokens} tokens, {stats.tokens / stats.seconds:.1f} tokens/s")
    if stats is not None and stats.route:
        parts.append(f"route {route_text(stats.route)}")
    return " · ".join(parts)
