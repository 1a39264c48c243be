"""The leaderboard: the servers ranked by the credit this daemon audited, your own row
marked, and your own credit per day as a sparkline."""

from __future__ import annotations

import unicodedata
from typing import Any

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Sparkline, Static
from volunteer.tui.render import short_peer

from volunteer.control.messages import BoardRow, LeaderboardReply

BOARD_COLUMNS = (
    "rank",
    "name",
    "peer",
    "recent/day",
    "total",
    "blocks",
    "uptime",
    "reputation",
    "note",
)
SELF_STYLE = "bold cyan"
NAME_CHARS = 24
_HIDDEN_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn"})
"""Control, format (bidi overrides, zero-width), surrogate, private-use, unassigned."""


class LeaderboardView(Vertical):
    """Shows the last leaderboard it was given (`show_board`)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._shown: tuple[LeaderboardReply | None, str | None] | None = None

    def compose(self) -> ComposeResult:
        yield Static("waiting for the daemon's leaderboard…", id="board-own", markup=False)
        yield Static(id="board-spark-label", markup=False)
        yield Sparkline([], id="board-spark")
        yield DataTable(id="board", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#board", DataTable).add_columns(*BOARD_COLUMNS)
        self.query_one("#board-spark-label", Static).display = False
        self.query_one("#board-spark", Sparkline).display = False

    def show_board(self, reply: LeaderboardReply | None, error: str | None = None) -> None:
        # Polled every few seconds: redrawing the same board would reset the cursor.
        if self._shown == (reply, error):
            return
        self._shown = (reply, error)
        own = self.query_one("#board-own", Static)
        table = self.query_one("#board", DataTable)
        if reply is None:
            own.update(f"no leaderboard to show: {error or 'no daemon is running'}")
            self._show_history([])
            table.clear()
            return
        own.update(own_line(reply))
        self._show_history(reply.history)
        cursor_row, scroll_y = table.cursor_row, table.scroll_y
        table.clear()
        for row in sorted(reply.rows, key=lambda r: r.rank):
            table.add_row(*board_cells(row))
        if table.row_count:  # where the reader was, not back at the top
            table.move_cursor(row=min(cursor_row, table.row_count - 1), scroll=False)
            table.scroll_to(y=scroll_y, animate=False)

    def _show_history(self, history: list[float]) -> None:
        label = self.query_one("#board-spark-label", Static)
        spark = self.query_one("#board-spark", Sparkline)
        # A flat line of zeros would draw as a full bar (the scale has no height).
        has_credit = bool(history) and max(history) > 0
        spark.data = list(history) if has_credit else []
        spark.display = has_credit
        label.display = bool(history)
        days = len(history)
        label.update(
            f"your credit per day, last {days} days (today {history[-1]:,.2f}, "
            f"best {max(history):,.2f})"
            if has_credit
            else f"your credit per day: none in the last {days} days"
        )


def own_line(reply: LeaderboardReply) -> Text:
    """Your rank and credit on the board, or why you are not on it."""
    mine = next((row for row in reply.rows if row.is_self), None)
    if mine is None:
        line = Text("you are not on the board yet", style="bold")
        line.append(
            f" ({len(reply.rows)} audited servers"
            if reply.rows
            else " (no audited servers yet: summaries are audited every few seconds after start"
        )
        line.append(f"; {sum(reply.history):,.2f} credit in the last {len(reply.history)} days)")
        return line
    line = Text(f"you: rank {mine.rank} of {len(reply.rows)}", style=SELF_STYLE)
    line.append(f"   total {mine.total:,.2f}   recent {mine.recent_average:,.2f}/day")
    note = _note(mine)
    if note:
        line.append("   ")
        line.append_text(note)
    return line


def board_cells(row: BoardRow) -> list[Text]:
    """One row of the table. Text, not str: the table reads a str as markup, and a
    stranger's name like "[/]" would crash the view or "[@click=...]" bind an action."""
    blocks = f"{row.blocks[0]}:{row.blocks[1]}" if row.blocks else "-"
    style = SELF_STYLE if row.is_self else ""
    cells = [
        Text(f"▶ {row.rank}" if row.is_self else str(row.rank), style=style),
        Text(plain(row.public_name) or "-", style=style),
        Text(plain(short_peer(row.peer_id)), style=style),
        Text(f"{row.recent_average:,.2f}", style=style, justify="right"),
        Text(f"{row.total:,.2f}", style=style, justify="right"),
        Text(blocks, style=style),
        Text(f"{row.uptime_share:.0%}", style=style, justify="right"),
        Text(f"{row.reputation:.2f}", style=style, justify="right"),
    ]
    note = _note(row) or Text("")
    if row.is_self:
        note = Text.assemble(("you", style), "  " if note else "", note)
    cells.append(note)
    return cells


def plain(text: str | None, max_chars: int = NAME_CHARS) -> str:
    """A peer's text fit to show: no control or format characters (they could move the
    terminal's cursor or reorder the line), one line, at most max_chars long."""
    if not text:
        return ""
    kept = (" " if char in "\n\t" else char for char in text[: max_chars * 4])
    shown = "".join(c for c in kept if unicodedata.category(c) not in _HIDDEN_CATEGORIES)
    return shown if len(shown) <= max_chars else shown[: max_chars - 1] + "…"


def _note(row: BoardRow) -> Text | None:
    if row.forfeited:
        return Text("forfeited", style="bold red")
    if row.held:
        return Text(f"held {row.held:,.2f}", style="yellow")
    return None
