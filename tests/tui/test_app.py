"""The TUI with a scripted daemon: each screen, its keys, and the chat stream."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

from textual.widgets import DataTable, Input, ListView, Static, TabbedContent
from volunteer.tui.app import VolunteerApp
from volunteer.tui.chat_history import ChatHistory
from volunteer.tui.chat_view import ChatView
from volunteer.tui.client import config_as_text
from volunteer.tui.log_panel import LogPanel
from volunteer.tui.messages import DaemonActionDone, StatusUpdated

from tests.tui.fakes import FIXED_GAUGES, SERVING, SWARM, FakeDaemon
from tests.tui.pilot import SIZE, WAIT_S, run, settle
from tests.tui.waiting import until
from volunteer.chat.store import ChatStore
from volunteer.paths import Paths
from volunteer.settings import read_config


async def show_the_swarm_tab(app: VolunteerApp, pilot: object) -> None:
    """Reads the daemon's status and the swarm, then switches to the swarm tab."""
    app.refresh_status()
    await settle(app, pilot)
    app.refresh_swarm()
    await settle(app, pilot)
    await pilot.press("3")  # type: ignore[attr-defined]


def text_of(app: VolunteerApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def test_the_dashboard_shows_the_daemon_and_the_machine() -> None:
    async def scenario(app: VolunteerApp, pilot: object) -> None:
        app.refresh_status()
        app.refresh_gauges()
        await settle(app, pilot)
        app.refresh_swarm()  # the number of blocks comes with the swarm
        await settle(app, pilot)
        app.refresh_status()
        await settle(app, pilot)
        assert "serving" in text_of(app, "#state") and "peers 2" in text_of(app, "#state")
        blocks = text_of(app, "#blocks")
        assert "blocks 0:15 of 30" in blocks and "weakest span" in blocks
        assert "tokens 3,400" in text_of(app, "#counters")
        assert "API" not in text_of(app, "#counters")  # not served
        assert "none in the last 3 minutes" in text_of(app, "#spark-label")
        app.query_one("#dash").show_status(SERVING.model_copy(update={"tokens_served": 3900}))
        assert "now " in text_of(app, "#spark-label")  # 500 tokens since the last poll
        api = {"api_url": "http://127.0.0.1:8000/v1", "api_requests": 1234}
        app.query_one("#dash").show_status(SERVING.model_copy(update=api))
        assert "API http://127.0.0.1:8000/v1 (1,234)" in text_of(app, "#counters")
        gauges = text_of(app, "#gauges")
        assert "42%" in gauges and "6.0 of 16.0 GiB" in gauges and "NVML not available" in gauges
        assert text_of(app, "#status-line") == "connected to the daemon"

    run(scenario, FakeDaemon())


def test_the_dashboard_shows_the_training_role_and_its_loss_curve() -> None:
    training = {
        "training_role": "peer",
        "training_state": "running",
        "training_job": "21eafdf45ff54241",
        "training_creator": "QmCreator",
        "training_stage": 1,
        "training_blocks": (15, 30),
        "training_step": 12,
        "training_steps": 100,
        "training_losses": [(0, 4.5), (1, 4.1), (2, 3.9)],
        "training_loss": 3.9,
        "training_stage_peers": [3, 2],
        "training_banned": ["QmLiar"],
    }

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        app.refresh_status()
        await settle(app, pilot)
        assert not app.query_one("#training").display  # not training: no panel
        app.query_one("#dash").show_status(SERVING.model_copy(update=training))
        await settle(app, pilot)
        panel = text_of(app, "#training")
        for shown in ("peer (running)", "12 of 100", "stage     1 (blocks 15:30)",
                      "stage 0: 3, stage 1: 2", "loss      3.9000", "QmLiar"):  # fmt: skip
            assert shown in panel, panel
        assert app.query_one("#training-spark").display
        assert list(app.query_one("#training-spark").data) == [4.5, 4.1, 3.9]

    run(scenario, FakeDaemon())


def test_no_daemon_shows_the_empty_state_and_s_starts_p_pauses_x_stops() -> None:
    daemon = FakeDaemon(running=False)

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        app.refresh_status()
        await settle(app, pilot)
        assert "press s to start one" in text_of(app, "#status-line").lower()
        assert "Press s to start one" in text_of(app, "#empty")
        await pilot.press("s")  # type: ignore[attr-defined]
        await settle(app, pilot)
        await settle(app, pilot)
        assert daemon.started == 1
        assert "serving" in text_of(app, "#state")
        await pilot.press("p")  # type: ignore[attr-defined]
        await settle(app, pilot)
        await settle(app, pilot)
        assert "paused" in text_of(app, "#state") and "paused by you" in text_of(app, "#state")
        await pilot.press("p")  # type: ignore[attr-defined]
        await settle(app, pilot)
        await settle(app, pilot)
        assert "serving" in text_of(app, "#state") and "paused" not in text_of(app, "#state")
        await pilot.press("x")  # type: ignore[attr-defined]
        await settle(app, pilot)
        await settle(app, pilot)
        assert daemon.stopped == 1 and not daemon.running

    run(scenario, daemon)


def test_the_app_follows_the_daemon_going_and_coming_back() -> None:
    daemon = FakeDaemon()

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        seen = []
        for running in (True, False, True):
            daemon.running = running
            app.refresh_status()
            await settle(app, pilot)
            seen.append(text_of(app, "#status-line"))
        assert seen[0] == "connected to the daemon"
        assert seen[1].startswith("the daemon went away")
        assert seen[2] == "reconnected to the daemon"

    run(scenario, daemon)


def test_number_and_function_keys_switch_tabs() -> None:
    async def scenario(app: VolunteerApp, pilot: object) -> None:
        tabs = app.query_one(TabbedContent)
        for key, tab in (("3", "swarm"), ("1", "dashboard"), ("2", "chat")):
            await pilot.press(key)  # type: ignore[attr-defined]
            assert tabs.active == tab
        # The chat tab focuses its prompt: digits are text there; F-keys still switch.
        await pilot.pause()  # type: ignore[attr-defined]
        await pilot.press("3")  # type: ignore[attr-defined]
        assert tabs.active == "chat" and app.query_one("#prompt", Input).value == "3"
        for key, tab in (("f3", "swarm"), ("f1", "dashboard"), ("f2", "chat")):
            await pilot.press(key)  # type: ignore[attr-defined]
            assert tabs.active == tab

    run(scenario, FakeDaemon())


def test_the_swarm_map_and_peers() -> None:
    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await show_the_swarm_tab(app, pilot)
        health = text_of(app, "#health")
        assert "weakest: 15:30 at 10 tokens/s; strongest 40 tokens/s" in health
        assert "servers 1111111111 1111111111 1111111111" in health
        table = app.query_one("#peers", DataTable)
        assert table.row_count == 2
        first = table.get_row_at(0)
        assert str(first[0]) == "alice" and first[2] == "0:15" and first[4] == "2.1"
        assert table.get_row_at(1)[4] == "-"  # a peer that did not answer a ping
        # What this daemon's checks found: standing, checks passed/failed, and a ban.
        assert (first[6], first[7], first[8]) == ("online", "0.83", "40/0")
        second = table.get_row_at(1)
        assert str(second[6]).startswith("banned: wrong output on blocks 15:30")
        assert second[8] == "2/1"

    run(scenario, FakeDaemon())


HOSTILE_TEXTS = ("[/]", "[@click=app.quit]free tokens[/]", "[bold]x[/italic]")
"""Markup that Textual would fail on, or bind to an action, if it read it as markup."""


def test_names_answers_and_errors_are_shown_as_plain_text() -> None:
    daemon = FakeDaemon()
    servers = [
        server.model_copy(update={"public_name": name})
        for server, name in zip(SWARM.servers, HOSTILE_TEXTS, strict=False)
    ]
    daemon.swarm_reply = SWARM.model_copy(update={"servers": servers})
    daemon.answer = list(HOSTILE_TEXTS)

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await show_the_swarm_tab(app, pilot)
        await pilot.pause()  # type: ignore[attr-defined]
        table = app.query_one("#peers", DataTable)
        names = {str(table.get_row_at(row)[0]) for row in range(table.row_count)}
        assert names == set(HOSTILE_TEXTS[:2])
        await _ask(app, pilot, HOSTILE_TEXTS[2])
        await settle(app, pilot)
        await until(pilot, lambda: not app.query(".streaming"), "the reply's Markdown", WAIT_S)
        text = _chat_text(app)
        assert f"› {HOSTILE_TEXTS[2]}" in text and "".join(HOSTILE_TEXTS) in text
        app.query_one("#status-line", Static).update(HOSTILE_TEXTS[0])
        await pilot.pause()  # type: ignore[attr-defined]
        assert text_of(app, "#status-line") == HOSTILE_TEXTS[0]
        assert app.is_running

    run(scenario, daemon)


async def _ask(app: VolunteerApp, pilot: object, question: str) -> None:
    await pilot.press("2")  # type: ignore[attr-defined]
    prompt = app.query_one("#prompt", Input)
    prompt.focus()
    prompt.value = question
    await pilot.press("enter")  # type: ignore[attr-defined]


def _chat_text(app: VolunteerApp) -> str:
    parts = []
    for widget in app.query_one("#messages").children:
        source = getattr(widget, "source", None)
        parts.append(source if source is not None else str(widget.render()))
    return "\n".join(parts)


def test_chat_streams_the_answer_with_its_route_and_speed() -> None:
    daemon = FakeDaemon()

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await _ask(app, pilot, "What is the capital of France?")
        await settle(app, pilot)
        await until(pilot, lambda: not app.query(".streaming"), "the reply's Markdown", WAIT_S)
        text = _chat_text(app)
        assert "› What is the capital of France?" in text
        assert "The capital of France is **Paris**." in text
        assert "8 tokens, 16.0 tokens/s" in text and "0:15 → " in text and "15:30" in text
        request = daemon.chat_requests[0]
        assert request["messages"] == [
            {"role": "user", "content": "What is the capital of France?"}
        ]
        assert (request["temperature"], request["top_p"], request["max_new_tokens"]) == (0, 1, 256)
        view = app.query_one(ChatView)
        assert view.messages[-1]["content"] == "The capital of France is **Paris**."
        # A second turn carries the first, and the side panel's settings.
        app.query_one("#system", Input).value = "Be brief."
        app.query_one("#temperature", Input).value = "0.7"
        await _ask(app, pilot, "And of Spain?")
        await settle(app, pilot)
        second = daemon.chat_requests[1]
        assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "user"]
        assert second["temperature"] == 0.7

    run(scenario, daemon)


def test_escape_stops_a_reply_and_ctrl_n_starts_a_new_conversation() -> None:
    daemon = FakeDaemon()
    daemon.hold_after_first_piece = threading.Event()

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await _ask(app, pilot, "Tell me a long story")
        await until(pilot, daemon.holding.is_set, "the first piece", WAIT_S)
        view = app.query_one(ChatView)
        assert view.is_streaming
        await pilot.press("escape")  # type: ignore[attr-defined]
        daemon.hold_after_first_piece.set()  # the next piece comes; the app ends there
        await settle(app, pilot)
        await until(pilot, lambda: not view.is_streaming, "the reply to end", WAIT_S)
        assert daemon.chat_closed.wait(5)
        text = _chat_text(app)
        assert "stopped" in text and "**Paris**" not in text
        await pilot.press("ctrl+n")  # type: ignore[attr-defined]
        await pilot.pause()  # type: ignore[attr-defined]
        assert view.messages == [] and _chat_text(app) == ""

    run(scenario, daemon)


def test_l_toggles_the_daemon_log(tmp_path: Path) -> None:
    log = tmp_path / "daemon.log"
    log.write_text("2026-11-29 INFO volunteer: serving blocks 0:15\n", encoding="utf-8")

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        panel = app.query_one("#log", LogPanel)
        assert panel.has_class("hidden")
        await pilot.press("l")  # type: ignore[attr-defined]
        await settle(app, pilot)
        assert not panel.has_class("hidden")
        with log.open("a", encoding="utf-8") as file:
            file.write("2026-11-29 INFO volunteer: moved to blocks 15:30\n")
        app.refresh_log()
        await settle(app, pilot)
        lines = [str(strip.text) for strip in panel.lines]
        assert any("serving blocks 0:15" in line for line in lines)
        assert any("moved to blocks 15:30" in line for line in lines)
        await pilot.press("l")  # type: ignore[attr-defined]
        assert panel.has_class("hidden")

    run(scenario, FakeDaemon(log_file=log))


def test_settings_are_checked_saved_to_the_file_and_applied_by_a_restart(tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path / "home", env={})
    paths.config_file.parent.mkdir(parents=True)
    paths.config_file.write_text("threads = 3\nport = 31337\n", encoding="utf-8")
    daemon = FakeDaemon(paths=paths)

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await pilot.press("4")  # type: ignore[attr-defined]
        await settle(app, pilot)
        threads = app.query_one("#setting-threads", Input)
        assert threads.value == "3" and app.query_one("#setting-model", Input).value == ""
        threads.value = "0"
        await pilot.press("ctrl+s")  # type: ignore[attr-defined]
        await settle(app, pilot)
        note = text_of(app, "#settings-note")
        assert "not saved" in note and "threads: must be at least 1" in note
        assert "threads = 3" in paths.config_file.read_text(encoding="utf-8")  # untouched
        threads.value = "2"
        app.query_one("#setting-public_name", Input).value = "ada"
        app.query_one("#setting-max_ram_gib", Input).value = "6.5"
        app.query_one("#setting-max_gpu_gib", Input).value = "3"
        app.query_one("#setting-run_on_battery", Input).value = "yes"  # an owner's rule
        app.query_one("#setting-schedule", Input).value = "22:00-7:00"
        await pilot.press("ctrl+s")  # type: ignore[attr-defined]
        await settle(app, pilot)
        assert "saved to config.toml" in text_of(app, "#settings-note")
        saved = paths.config_file.read_text(encoding="utf-8")
        assert "run_on_battery = true" in saved and 'schedule = "22:00-07:00"' in saved
        assert config_as_text(read_config(paths))["run_on_battery"] == "yes"  # as typed back
        assert "threads = 2" in saved and 'public_name = "ada"' in saved
        assert "max_ram_gib = 6.5" in saved and "max_gpu_gib = 3.0" in saved
        assert "port = 31337" in saved  # others kept
        await pilot.press("ctrl+r")  # type: ignore[attr-defined]
        await settle(app, pilot)
        assert daemon.restarted == 1 and "serving blocks" in text_of(app, "#settings-note")

    run(scenario, daemon)


def test_chats_are_saved_listed_and_reopened(tmp_path: Path) -> None:
    store = ChatStore.open(tmp_path / "chats.sqlite3")
    daemon = FakeDaemon()

    async def main() -> None:
        app = VolunteerApp(
            daemon, gauges=lambda: FIXED_GAUGES, history=ChatHistory(store), poll=False
        )
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("2")
            app.query_one("#system", Input).value = "Be brief."
            await _ask(app, pilot, "What is the capital of France?")
            await settle(app, pilot)
            await settle(app, pilot)
            [summary] = store.list()
            assert summary.title == "What is the capital of France?"
            saved = store.load(summary.id)
            assert saved.system_prompt == "Be brief." and saved.settings["max_new_tokens"] == 256
            assert [m.role for m in saved.messages] == ["user", "assistant"]
            answer = saved.messages[1]
            assert answer.content == "The capital of France is **Paris**."
            assert answer.tokens == 8 and answer.route[0][1:] == (0, 15)
            listing = app.query_one("#history", ListView)
            assert len(listing.children) == 1
            # A new conversation, then the saved one reopened from the list.
            await pilot.press("ctrl+n")
            await pilot.pause()
            view = app.query_one(ChatView)
            assert view.messages == [] and app.query_one("#system", Input).value == "Be brief."
            app.query_one("#system", Input).value = ""
            listing.focus()
            listing.index = 0
            await pilot.press("enter")
            await settle(app, pilot)
            await until(pilot, lambda: len(view.messages) == 2, "the reopened chat", WAIT_S)
            assert [m["role"] for m in view.messages] == ["user", "assistant"]
            assert app.query_one("#system", Input).value == "Be brief."
            assert "Paris" in _chat_text(app) and "saved · 8 tokens" in _chat_text(app)
            # The next question continues that conversation in the store.
            await _ask(app, pilot, "And of Spain?")
            await settle(app, pilot)
            await settle(app, pilot)
            assert len(store.list()) == 1 and len(store.load(summary.id).messages) == 4

    try:
        asyncio.run(main())
    finally:
        store.close()


def test_an_answer_that_arrives_while_the_app_closes_is_dropped() -> None:
    app = VolunteerApp(FakeDaemon(), gauges=lambda: FIXED_GAUGES, poll=False)

    async def main() -> None:
        async with app.run_test():
            pass
        # A worker's answer posted just before the app closed, handled after its widgets
        # went: nothing to show it on, and no crash.
        app.on_status_updated(StatusUpdated(SERVING))
        app.on_daemon_action_done(DaemonActionDone("stopped"))

    asyncio.run(main())
