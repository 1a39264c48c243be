"""The TUI against a real daemon on 127.0.0.1 serving the real SmolLM2: the dashboard
shows its blocks, the swarm map its server, and the chat answers with Paris."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from textual.widgets import DataTable, Input, Static
from volunteer.tui.app import VolunteerApp
from volunteer.tui.chat_view import ChatView
from volunteer.tui.client import ControlDaemonClient

from tests.daemon.homes import one_daemon
from tests.tui.waiting import until
from volunteer.control.endpoint import use_tcp
from volunteer.paths import Paths

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

WAIT_S = 120.0


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[Paths]:
    with one_daemon(tmp_path_factory.mktemp("tui"), smollm2_folder) as (homes, home):
        yield Paths.resolve(home=home, env=homes.env)


async def _until(pilot: object, check: Callable[[], object], what: str) -> None:
    await until(pilot, check, what, WAIT_S)


def test_dashboard_swarm_and_chat_against_a_real_daemon(daemon: Paths) -> None:
    async def main() -> None:
        app = VolunteerApp(ControlDaemonClient(daemon))
        async with app.run_test(size=(120, 40)) as pilot:

            def blocks() -> str:
                return str(app.query_one("#blocks", Static).render())

            await _until(pilot, lambda: "blocks 0:30 of 30" in blocks(), "the blocks bar")
            assert "serving" in str(app.query_one("#state", Static).render())
            await pilot.press("3")
            table = app.query_one("#peers", DataTable)
            await _until(pilot, lambda: table.row_count == 1, "the swarm's one server")
            assert table.get_row_at(0)[2] == "0:30"
            await pilot.press("2")
            prompt = app.query_one("#prompt", Input)
            prompt.focus()
            prompt.value = "What is the capital of France?"
            await pilot.press("enter")
            view = app.query_one(ChatView)
            await _until(pilot, lambda: len(view.messages) == 2, "the answer")
            assert "Paris" in view.messages[1]["content"]
            stats = [str(w.render()) for w in app.query("#messages .stats")]
            assert stats and "tokens/s" in stats[-1] and "0:30" in stats[-1]
            # Pause: the daemon says so and its record goes OFFLINE; then resume.
            await pilot.press("f1", "p")

            def state() -> str:
                return str(app.query_one("#state", Static).render())

            await _until(pilot, lambda: "paused" in state(), "the paused state")
            app.refresh_swarm()
            await _until(pilot, lambda: table.get_row_at(0)[6] == "offline", "an OFFLINE record")
            await pilot.press("p")
            await _until(pilot, lambda: "serving" in state(), "serving again")

    asyncio.run(main())


def test_the_leaderboard_against_a_real_daemon(daemon: Paths) -> None:
    """The tab shows the daemon's board as it answers (it may not have audited anyone yet:
    then it says so), and its own credit history."""

    async def main() -> None:
        app = VolunteerApp(ControlDaemonClient(daemon))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f5")

            def own() -> str:
                return str(app.query_one("#board-own", Static).render())

            await _until(pilot, lambda: "waiting" not in own(), "the daemon's board")
            assert "no leaderboard to show" not in own(), own()
            table = app.query_one("#board", DataTable)
            if table.row_count:  # a board: its own row, if on it, is marked
                assert "you:" in own() or "not on the board yet" in own()
            else:
                assert "no audited servers yet" in own() or "not on the board yet" in own()

    asyncio.run(main())


def test_settings_against_a_real_daemon(daemon: Paths) -> None:
    """The daemon takes on a new public name at once (its record says it), keeps the
    cache size for a restart, and the --threads flag it started with wins over the file."""

    async def main() -> None:
        app = VolunteerApp(ControlDaemonClient(daemon))
        async with app.run_test(size=(120, 40)) as pilot:
            await pilot.press("f4")
            await app.workers.wait_for_complete()  # the form shows the file first
            await pilot.pause()
            edits = {"public_name": "ada", "cache_tokens": "512", "threads": "2"}
            for name, value in edits.items():
                app.query_one(f"#setting-{name}", Input).value = value
            await pilot.press("ctrl+s")

            def note() -> str:
                return str(app.query_one("#settings-note", Static).render())

            await _until(pilot, lambda: "saved to config.toml" in note(), "the save")
            assert "applied now: public name" in note()
            assert "applied on restart (ctrl+r): attention cache" in note()
            # --threads 1 was a flag of `volunteer start`: it wins over the file.
            assert "VOLUNTEER_ variable the daemon started with: CPU threads" in note()
            saved = daemon.config_file.read_text(encoding="utf-8")
            assert 'public_name = "ada"' in saved and "cache_tokens = 512" in saved
            await pilot.press("f3")
            app.refresh_swarm()
            table = app.query_one("#peers", DataTable)
            await _until(
                pilot,
                lambda: table.row_count == 1 and str(table.get_row_at(0)[0]) == "ada",
                "the name",
            )
            await pilot.press("f1")
            app.refresh_status()

            def state() -> str:
                return str(app.query_one("#state", Static).render())

            await _until(pilot, lambda: "wait for a restart" in state(), "the pending restart")
            assert "attention cache" in state()

    asyncio.run(main())
