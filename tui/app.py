"""`volunteer tui`: the volunteer's window on the daemon — dashboard, chat, swarm map,
settings, leaderboard, fine-tuning, log.

The app gets its daemon client in the constructor (`volunteer.tui.client.DaemonClient`);
all daemon I/O runs in thread workers and comes back as messages
(`volunteer.tui.messages`), so the screen never waits on the daemon. It polls the status
and the fine-tuning job every second, the swarm and the leaderboard every few seconds;
when the daemon goes away it shows the empty state, and it picks the daemon up again by
itself when one runs, saying so in the status line.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.css.query import NoMatches
from textual.widgets import Footer, Static, TabbedContent, TabPane
from volunteer.tui.chat_history import ChatHistory
from volunteer.tui.chat_view import ChatView
from volunteer.tui.client import DaemonClient
from volunteer.tui.dashboard import Dashboard
from volunteer.tui.finetune_view import FinetuneView
from volunteer.tui.gauges import GaugeReader, Gauges
from volunteer.tui.leaderboard_view import LeaderboardView
from volunteer.tui.log_panel import LogPanel, LogTail
from volunteer.tui.messages import (
    AdaptersListed,
    ChatWithAdapter,
    ConfigLoaded,
    DaemonActionDone,
    FinetuneUpdated,
    GaugesUpdated,
    LeaderboardUpdated,
    LogLines,
    StatusUpdated,
    SwarmUpdated,
)
from volunteer.tui.settings_view import SettingsView
from volunteer.tui.swarm_view import SwarmView

Handler = TypeVar("Handler", bound=Callable[..., None])


def _unless_closing(handler: Handler) -> Handler:
    """For handlers of worker answers, and workers that look at widgets: one that runs
    while the app closes finds its widgets gone; there is nothing left to show it on."""

    @functools.wraps(handler)
    def guarded(*args: Any) -> None:
        try:
            handler(*args)
        except NoMatches:
            if args[0].is_running:  # a real bug while the app runs
                raise

    return guarded  # type: ignore[return-value]


STATUS_PERIOD_S = 1.0
SWARM_PERIOD_S = 5.0
LEADERBOARD_PERIOD_S = 5.0
FINETUNE_PERIOD_S = 1.0
LOG_PERIOD_S = 0.5


class VolunteerApp(App[None]):
    CSS_PATH = "volunteer.tcss"
    TITLE = "volunteer"
    BINDINGS: ClassVar[list[BindingType]] = [
        # F-keys switch tabs from anywhere, even while typing in the chat.
        # The tab labels name these keys; the footer keeps its width for the actions.
        Binding("f1", "show_tab('dashboard')", "Dashboard", show=False, priority=True),
        Binding("f2", "show_tab('chat')", "Chat", show=False, priority=True),
        Binding("f3", "show_tab('swarm')", "Swarm", show=False, priority=True),
        Binding("f4", "show_tab('settings')", "Settings", show=False, priority=True),
        Binding("f5", "show_tab('leaderboard')", "Leaderboard", show=False, priority=True),
        Binding("f6", "show_tab('finetune')", "Finetune", show=False, priority=True),
        Binding("1", "show_tab('dashboard')", "Dashboard", show=False),
        Binding("4", "show_tab('settings')", "Settings", show=False),
        Binding("2", "show_tab('chat')", "Chat", show=False),
        Binding("3", "show_tab('swarm')", "Swarm", show=False),
        Binding("5", "show_tab('leaderboard')", "Leaderboard", show=False),
        Binding("6", "show_tab('finetune')", "Finetune", show=False),
        # The finetune tab's own `c` needs the focus in it; this one works there without.
        Binding("c", "chat_with_adapter", "Chat with it", show=False),
        Binding("s", "start_daemon", "Start"),
        Binding("x", "stop_daemon", "Stop"),
        Binding("p", "toggle_pause", "Pause/resume"),
        Binding("l", "toggle_log", "Log"),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(
        self,
        client: DaemonClient,
        *,
        gauges: Callable[[], Gauges] | None = None,
        history: ChatHistory | None = None,
        poll: bool = True,
    ) -> None:
        """
        Args:
            client: the daemon, as `volunteer.tui.client.DaemonClient`.
            gauges: reads the machine's gauges (default: psutil and NVML here).
            history: where chats are saved and reopened (None: not saved).
            poll: poll the daemon and the machine on timers (tests drive `refresh_*`).
        """
        super().__init__()
        self.client = client
        self._read_gauges = gauges or GaugeReader(Path.home())
        self._poll = poll
        self._history = history
        self._log = LogTail(client.log_file)
        self.daemon_seen: bool | None = None
        self.daemon_state: str | None = None
        """Whether the last poll found a daemon (None before the first poll)."""

    def compose(self) -> ComposeResult:
        with TabbedContent(initial="dashboard"):
            with TabPane(r"Dashboard \[F1]", id="dashboard"):
                yield Dashboard(id="dash")
            with TabPane(r"Chat \[F2]", id="chat"):
                yield ChatView(self._history, id="chat-view")
            with TabPane(r"Swarm \[F3]", id="swarm"):
                yield SwarmView(id="swarm-view")
            with TabPane(r"Settings \[F4]", id="settings"):
                yield SettingsView(id="settings-view")
            with TabPane(r"Leaderboard \[F5]", id="leaderboard"):
                yield LeaderboardView(id="leaderboard-view")
            with TabPane(r"Finetune \[F6]", id="finetune"):
                yield FinetuneView(id="finetune-view")
        yield LogPanel(id="log", max_lines=2000, wrap=False, classes="hidden")
        yield Static("connecting to the daemon…", id="status-line", markup=False)
        yield Footer()

    def on_mount(self) -> None:
        if self._poll:
            self.refresh_status()
            self.refresh_gauges()
            self.set_interval(STATUS_PERIOD_S, self.refresh_status)
            self.set_interval(STATUS_PERIOD_S, self.refresh_gauges)
            self.set_interval(SWARM_PERIOD_S, self.refresh_swarm)
            self.set_interval(LEADERBOARD_PERIOD_S, self.refresh_leaderboard)
            self.set_interval(FINETUNE_PERIOD_S, self.refresh_finetune)
            self.set_interval(LOG_PERIOD_S, self.refresh_log)

    # Workers: daemon and machine I/O off the event loop, answers as messages.

    @work(thread=True, exclusive=True, group="status")
    def refresh_status(self) -> None:
        try:
            self.post_message(StatusUpdated(self.client.status()))
        except Exception as exc:  # a daemon that answers badly is shown, not fatal
            self.post_message(StatusUpdated(None, error=str(exc) or type(exc).__name__))

    @work(thread=True, exclusive=True, group="swarm")
    def refresh_swarm(self) -> None:
        if not self.daemon_seen:
            return
        try:
            swarm = self.client.swarm()
        except Exception as exc:
            self.post_message(SwarmUpdated(None, error=str(exc) or type(exc).__name__))
            return
        try:
            peers = self.client.peers()
        except Exception:  # an older daemon, or one busy: the map still shows
            peers = None
        try:
            self.post_message(SwarmUpdated(swarm, peers=peers))
        except Exception as exc:
            self.post_message(SwarmUpdated(None, error=str(exc) or type(exc).__name__))

    @work(thread=True, exclusive=True, group="leaderboard")
    def refresh_leaderboard(self) -> None:
        if not self.daemon_seen:  # the status poll shows the view empty
            return
        try:
            self.post_message(LeaderboardUpdated(self.client.leaderboard()))
        except Exception as exc:  # an older daemon without a board, or one busy: shown
            self.post_message(LeaderboardUpdated(None, error=str(exc) or type(exc).__name__))

    @work(thread=True, exclusive=True, group="finetune")
    def refresh_finetune(self) -> None:
        if not self.daemon_seen:
            return
        try:
            self.post_message(FinetuneUpdated(self.client.finetune_status()))
        except Exception as exc:  # an older daemon without fine-tuning, or one busy: shown
            self.post_message(FinetuneUpdated(None, error=str(exc) or type(exc).__name__))

    @work(thread=True, exclusive=True, group="adapters")
    def refresh_adapters(self) -> None:
        if not self.daemon_seen:
            return
        try:
            self.post_message(AdaptersListed(self.client.adapters()))
        except Exception as exc:  # the chat goes on with the base model
            self.post_message(AdaptersListed(None, error=str(exc) or type(exc).__name__))

    @work(thread=True, exclusive=True, group="gauges")
    def refresh_gauges(self) -> None:
        self.post_message(GaugesUpdated(self._read_gauges()))

    @work(thread=True, exclusive=True, group="log")
    @_unless_closing  # this worker looks at the log panel, gone once the app closes
    def refresh_log(self) -> None:
        if not self.query_one("#log", LogPanel).has_class("hidden"):
            lines = self._log.read_new()
            if lines:
                self.post_message(LogLines(lines))

    # Message handlers: update the widgets.

    @_unless_closing
    def on_status_updated(self, message: StatusUpdated) -> None:
        status = message.status
        is_up = status is not None
        line = self.query_one("#status-line", Static)
        if message.error:
            line.update(f"the daemon did not answer: {message.error}")
        elif is_up and self.daemon_seen is False:
            line.update("reconnected to the daemon")
        elif is_up and self.daemon_seen is None:
            line.update("connected to the daemon")
        elif not is_up and self.daemon_seen:
            line.update("the daemon went away; waiting for it (press s to start one)")
        elif not is_up:
            line.update("no daemon is running (press s to start one)")
        first_sight = is_up and not self.daemon_seen
        self.daemon_seen = is_up
        self.daemon_state = status.state if status is not None else None
        self.query_one(Dashboard).show_status(status)
        if first_sight:
            self.refresh_swarm()
            self.refresh_leaderboard()
            self.refresh_finetune()
            self.refresh_adapters()
        elif not is_up:  # the daemon went, and its board and job with it
            self.query_one(LeaderboardView).show_board(None, message.error)
            self.query_one(FinetuneView).show_job(None, message.error or "no daemon is running")

    @_unless_closing
    def on_swarm_updated(self, message: SwarmUpdated) -> None:
        if message.swarm is not None:
            dashboard = self.query_one(Dashboard)
            dashboard.total_blocks = message.swarm.num_blocks or None
        self.query_one(SwarmView).show_swarm(message.swarm, message.error, message.peers)

    @_unless_closing
    def on_leaderboard_updated(self, message: LeaderboardUpdated) -> None:
        self.query_one(LeaderboardView).show_board(message.board, message.error)

    @_unless_closing
    def on_finetune_updated(self, message: FinetuneUpdated) -> None:
        view = self.query_one(FinetuneView)
        was = view.job
        view.show_job(message.job, message.error)
        job = message.job
        if job is not None and job.state == "done" and (was is None or was.state != "done"):
            self.refresh_adapters()  # the new adapter, for the chat's choice

    @_unless_closing
    def on_adapters_listed(self, message: AdaptersListed) -> None:
        if message.reply is not None:
            self.query_one(ChatView).show_adapters(message.reply.adapters)

    def on_chat_with_adapter(self, message: ChatWithAdapter) -> None:
        self.query_one(ChatView).select_adapter(message.adapter)
        self.action_show_tab("chat")

    @_unless_closing
    def on_gauges_updated(self, message: GaugesUpdated) -> None:
        self.query_one(Dashboard).show_gauges(message.gauges)

    @_unless_closing
    def on_log_lines(self, message: LogLines) -> None:
        self.query_one("#log", LogPanel).show_lines(message.lines)

    @_unless_closing
    def on_daemon_action_done(self, message: DaemonActionDone) -> None:
        self.query_one("#status-line", Static).update(message.said)
        self.refresh_status()

    # Actions (key bindings).

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        if event.pane.id == "chat":  # ready to type, with the adapters there are now
            self.query_one("#prompt").focus()
            self.refresh_adapters()
        elif event.pane.id == "settings":
            self.query_one("#setting-public_name").focus()
            self.load_config()
        elif event.pane.id == "leaderboard":  # fresh at once, not at the next poll
            self.refresh_leaderboard()
        elif event.pane.id == "finetune":
            self.query_one(FinetuneView).focus_first()
            self.refresh_finetune()

    @work(thread=True, exclusive=True, group="settings")
    def load_config(self) -> None:
        try:
            values = self.client.read_config()
        except Exception as exc:  # a malformed config.toml: say so on the form
            self.post_message(ConfigLoaded({}, error=str(exc)))
            return
        self.post_message(ConfigLoaded(values))

    @_unless_closing
    def on_config_loaded(self, message: ConfigLoaded) -> None:
        view = self.query_one(SettingsView)
        view.show_config(message.values)
        if message.error:
            view.query_one("#settings-note", Static).update(f"config.toml: {message.error}")

    def action_show_tab(self, tab: str) -> None:
        # A focused widget in the pane we leave would pull its pane back to the front.
        self.set_focus(None)
        self.query_one(TabbedContent).active = tab

    def action_chat_with_adapter(self) -> None:
        if self.query_one(TabbedContent).active == "finetune":
            self.query_one(FinetuneView).action_chat_with_adapter()

    def action_toggle_log(self) -> None:
        panel = self.query_one("#log", LogPanel)
        panel.toggle_class("hidden")
        if not panel.has_class("hidden"):
            self.refresh_log()

    def action_start_daemon(self) -> None:
        if self.daemon_seen:
            self.query_one("#status-line", Static).update("the daemon is already running")
            return
        self.query_one("#status-line", Static).update("starting the daemon…")
        self._run_daemon_action(self.client.start)

    def action_stop_daemon(self) -> None:
        if not self.daemon_seen:
            self.query_one("#status-line", Static).update("no daemon is running")
            return
        self.query_one("#status-line", Static).update("stopping the daemon…")
        self._run_daemon_action(self.client.stop)

    def action_toggle_pause(self) -> None:
        if not self.daemon_seen:
            self.query_one("#status-line", Static).update("no daemon is running")
            return
        is_paused = self.daemon_state == "paused"
        self.query_one("#status-line", Static).update("resuming…" if is_paused else "pausing…")
        self._run_daemon_action(lambda: self.client.set_paused(not is_paused))

    @work(thread=True, exclusive=True, group="daemon-action")
    def _run_daemon_action(self, action: Callable[[], str]) -> None:
        try:
            said = action()
        except Exception as exc:
            said = f"failed: {exc}"
        self.post_message(DaemonActionDone(said))
