"""The leaderboard tab with a scripted daemon: the ranked rows, your own row and credit,
escrow notes, peers' names as plain text, live refresh and a daemon that fails."""

from __future__ import annotations

import pytest
from rich.text import Text
from textual.widgets import DataTable, Input, Sparkline, Static, TabbedContent
from volunteer.tui import app as app_module
from volunteer.tui.app import VolunteerApp

from tests.tui.fakes import BOARD, FakeDaemon
from tests.tui.pilot import WAIT_S, run, settle
from tests.tui.waiting import until
from volunteer.control.endpoint import ControlError
from volunteer.control.messages import LeaderboardReply


async def show_the_board(app: VolunteerApp, pilot: object) -> None:
    """Finds the daemon (which fetches its board) and switches to the leaderboard tab."""
    app.refresh_status()
    await settle(app, pilot)
    await pilot.press("5")  # type: ignore[attr-defined]
    await settle(app, pilot)


def text_of(app: VolunteerApp, selector: str) -> str:
    return str(app.query_one(selector, Static).render())


def cells(table: DataTable[object], row: int) -> list[str]:
    return [str(cell) for cell in table.get_row_at(row)]


def test_5_and_f5_show_the_leaderboard_tab() -> None:
    async def scenario(app: VolunteerApp, pilot: object) -> None:
        tabs = app.query_one(TabbedContent)
        await pilot.press("5")  # type: ignore[attr-defined]
        assert tabs.active == "leaderboard"
        await pilot.press("2")  # type: ignore[attr-defined]
        assert app.query_one("#prompt", Input).has_focus
        await pilot.press("f5")  # type: ignore[attr-defined]  # even while typing
        assert tabs.active == "leaderboard"

    run(scenario, FakeDaemon())


def test_the_board_ranks_servers_and_marks_your_own_row_and_escrow() -> None:
    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await show_the_board(app, pilot)
        table = app.query_one("#board", DataTable)
        assert table.row_count == 4
        first = cells(table, 0)
        assert first[:8] == [
            "1",
            "alice",
            "QmAAAA…AAAAA1",
            "12.50",
            "340.25",
            "0:15",
            "97%",
            "0.83",
        ]
        assert first[8] == ""
        own = table.get_row_at(1)
        assert [str(cell) for cell in own[:3]] == ["▶ 2", "ada", "QmSELF…FSELF3"]
        assert str(own[8]) == "you"
        assert all(isinstance(cell, Text) and "bold" in str(cell.style) for cell in own[:8])
        assert not any("bold" in str(cell.style) for cell in table.get_row_at(0)[:8])
        held = cells(table, 2)
        assert held[1] == "-" and held[8] == "held 3.00"
        assert cells(table, 3)[5] == "-" and cells(table, 3)[8] == "forfeited"
        own_line = text_of(app, "#board-own")
        assert "rank 2 of 4" in own_line and "total 20.50" in own_line
        assert "recent 4.00/day" in own_line
        assert "last 7 days (today 8.00, best 8.00)" in text_of(app, "#board-spark-label")
        spark = app.query_one("#board-spark", Sparkline)
        assert spark.display and list(spark.data or []) == BOARD.history

    run(scenario, FakeDaemon())


def test_peers_names_are_shown_as_plain_text() -> None:
    names = ["[bold red]mallory[/]", "[/]", "[@click=app.quit]x[/]", "evil\x1b[2J\u202eeman\nx"]
    rows = [
        {"rank": rank, "peer_id": f"Qm{rank}", "public_name": name, "recent_average": 1.0,
         "total": 1.0}
        for rank, name in enumerate(names, 1)
    ]  # fmt: skip
    daemon = FakeDaemon()
    daemon.board_reply = LeaderboardReply.model_validate({"rows": rows})

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await show_the_board(app, pilot)
        table = app.query_one("#board", DataTable)
        shown = [cells(table, row)[1] for row in range(table.row_count)]
        assert shown == [*names[:3], "evil[2Jeman x"]
        assert app.is_running  # the [@click=...] name bound no action

    run(scenario, daemon)


def test_a_board_without_you_and_without_credit() -> None:
    daemon = FakeDaemon()
    daemon.board_reply = BOARD.model_copy(update={"rows": [BOARD.rows[0]], "history": [0.0] * 30})

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await show_the_board(app, pilot)
        assert "not on the board yet (1 audited servers" in text_of(app, "#board-own")
        assert "none in the last 30 days" in text_of(app, "#board-spark-label")
        assert not app.query_one("#board-spark", Sparkline).display  # zeros: no full bar
        daemon.board_reply = LeaderboardReply()
        app.refresh_leaderboard()
        await settle(app, pilot)
        assert "no audited servers yet" in text_of(app, "#board-own")
        assert app.query_one("#board", DataTable).row_count == 0

    run(scenario, daemon)


def test_a_failing_daemon_and_no_daemon_are_said_and_the_board_comes_back() -> None:
    daemon = FakeDaemon()
    daemon.board_reply = ControlError("unknown method 'leaderboard'")

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        await show_the_board(app, pilot)
        assert "no leaderboard to show: unknown method" in text_of(app, "#board-own")
        daemon.board_reply = BOARD
        app.refresh_leaderboard()
        await settle(app, pilot)
        assert app.query_one("#board", DataTable).row_count == 4
        daemon.running = False
        app.refresh_status()
        await settle(app, pilot)
        assert "no daemon is running" in text_of(app, "#board-own")
        assert app.query_one("#board", DataTable).row_count == 0
        daemon.running = True
        app.refresh_status()  # found again: its board comes with it
        await settle(app, pilot)
        await settle(app, pilot)
        assert app.query_one("#board", DataTable).row_count == 4

    run(scenario, daemon)


def test_the_board_refreshes_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(app_module, "LEADERBOARD_PERIOD_S", 0.1)
    daemon = FakeDaemon()

    async def scenario(app: VolunteerApp, pilot: object) -> None:
        table = app.query_one("#board", DataTable)
        await until(pilot, lambda: table.row_count == 4, "the first board", WAIT_S)
        table.move_cursor(row=2)
        daemon.board_reply = BOARD.model_copy(update={"rows": BOARD.rows[:3]})
        await until(pilot, lambda: table.row_count == 3, "the next board", WAIT_S)
        assert table.cursor_row == 2  # the reader's place is kept

    run(scenario, daemon, poll=True)
