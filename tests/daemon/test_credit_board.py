"""The leaderboard's rows: ranked by recent credit out of escrow, escrow forfeited by a
ban here, uptime from this peer's looks, and all of it kept across restarts."""

from __future__ import annotations

import time
from pathlib import Path

from volunteer.scheduler.credit import ESCROW_CHECKS

from volunteer.daemon.credit_board import board_rows
from volunteer.trust.board import Board
from volunteer.trust.credit_summary import Summary
from volunteer.trust.reputation import Reputation


def _summary(credit: int, *, passed: int = 0, clients: int = 0, name: str = "") -> Summary:
    return Summary(
        model="m", public_name=name, as_of_s=time.time(), receipts=1, root=b"r" * 32,
        sums=(credit, credit, passed), clients=clients, start=0, end=15,
    )  # fmt: skip


def test_rows_rank_released_credit_first_and_a_ban_forfeits_escrow(tmp_path: Path) -> None:
    board, reputation = Board(tmp_path / "board.sqlite"), Reputation()
    board.look({"old", "new", "cheat"})
    board.audited("old", _summary(2_000, passed=ESCROW_CHECKS, clients=2, name="[b]x[/b]"), 1.0)
    board.audited("new", _summary(9_000), 1.0)
    board.audited("cheat", _summary(50_000), 1.0)
    reputation.ban("cheat", "wrong output")
    board.look({"old", "new"})
    rows = board_rows(board, reputation, own="new", now_s=time.time())
    assert [row.peer_id for row in rows] == ["old", "new", "cheat"]
    by_peer = {row.peer_id: row for row in rows}
    assert by_peer["old"].rank == 1 and by_peer["old"].held == 0.0  # released ranks first
    assert by_peer["new"].held == by_peer["new"].total == 9.0 and by_peer["new"].is_self
    assert by_peer["cheat"].forfeited and by_peer["cheat"].total == 0.0
    assert by_peer["old"].public_name == "[b]x[/b]" and by_peer["cheat"].uptime_share == 0.5
    board.failed("old", "a drawn receipt is for another server", b"z" * 32)
    board.failed("liar", "credit without receipts", b"y" * 32)  # none of its summaries held
    board.close()
    again = board_rows(Board(tmp_path / "board.sqlite"), reputation, own="new", now_s=time.time())
    liar = again.pop(2)
    assert (liar.peer_id, liar.total, liar.dropped) == ("liar", 0.0, "credit without receipts")
    assert [r.model_dump(exclude={"dropped", "rank"}) for r in again] == [
        r.model_dump(exclude={"dropped", "rank"}) for r in rows
    ]
    assert {r.peer_id: r.dropped for r in again}["old"] == "a drawn receipt is for another server"


def test_audit_rounds_come_further_apart_for_a_large_or_a_quiet_board() -> None:
    from volunteer.daemon.credit_service import READ_PER_ROUND, audit_period_s

    assert audit_period_s(10.0, 3, 0) == 10.0
    assert audit_period_s(10.0, 4 * READ_PER_ROUND, 0) == 40.0  # each read checks them all
    assert audit_period_s(10.0, 3, 1) == audit_period_s(10.0, 3, 9) == 20.0  # quiet: at most 2x
