"""The leaderboard's rows, from the audited board and this daemon's own checks."""

from __future__ import annotations

from volunteer.control.messages import BoardRow
from volunteer.models.config import ModelConfig
from volunteer.scheduler.credit import (
    CheckTally,
    Standing,
    decayed_milli,
    is_released,
    standing_of,
)
from volunteer.scheduler.offload_cost import TransformerShape
from volunteer.scheduler.verification import standing
from volunteer.trust.board import Board
from volunteer.trust.credit_summary import Summary
from volunteer.trust.credit_tree import CREDIT, PASSED, RECENT
from volunteer.trust.ledger import Built
from volunteer.trust.reputation import Reputation

NOTHING = Standing(0.0, 0.0, 0.0)


def params_per_block(config: ModelConfig) -> int:
    """The weights of one transformer block, the credit formula's model size."""
    return TransformerShape.of(config).params_per_layer


def credit_standing(built: Built) -> Standing:
    """This daemon's credit by its own receipts (it does not know of its own bans)."""
    credit, recent, _ = built.tree.sums
    return standing_of(credit, recent, released=is_released(built.checks), banned=False)


def summary_standing(summary: Summary, *, banned: bool, now_s: float) -> Standing:
    """A server's credit on the board: its audited sums, the recent part decayed on to
    now, its escrow as its record and this daemon's bans say."""
    checks = CheckTally(summary.sums[PASSED], summary.failed, summary.clients)
    recent = decayed_milli(summary.sums[RECENT], summary.as_of_s, now_s)
    return standing_of(summary.sums[CREDIT], recent, released=is_released(checks), banned=banned)


def board_rows(board: Board, reputation: Reputation, *, own: str, now_s: float) -> list[BoardRow]:
    """Every audited server (and, with nothing, each whose summaries all failed), ranked by
    recent average credit out of escrow, then by total (a forfeited escrow last)."""
    found = []
    for entry in board:
        summary = entry.summary
        if summary is None and not entry.failure:
            continue  # seen, not audited yet
        record = reputation.of(entry.peer_id)
        banned = record.bans > 0 or record.is_banned(now_s)
        # A server whose every summary failed is listed with nothing, and why.
        credit = summary_standing(summary, banned=banned, now_s=now_s) if summary else NOTHING
        blocks = (summary.start, summary.end) if summary else (0, 0)
        found.append(
            BoardRow(
                rank=0,
                peer_id=entry.peer_id,
                public_name=(summary.public_name if summary else "") or None,
                recent_average=round(credit.recent_average, 6),
                total=round(credit.total, 6),
                held=round(credit.held, 6),
                forfeited=credit.forfeited or (summary is None and banned),
                blocks=blocks if blocks[1] > blocks[0] else None,
                block_tokens=summary.block_tokens if summary else 0,
                uptime_share=round(entry.uptime_share, 4),
                reputation=round(standing(record.record), 3),
                audited_s=entry.audited_s,
                is_self=entry.peer_id == own,
                dropped=entry.failure or None,
            )
        )
    found.sort(
        key=lambda r: (r.forfeited, -(0.0 if r.held else r.recent_average), -r.total, r.peer_id)
    )
    return [row.model_copy(update={"rank": rank}) for rank, row in enumerate(found, 1)]
