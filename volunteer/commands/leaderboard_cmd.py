"""`volunteer leaderboard`: the servers ranked by the credit the local daemon audited."""

from __future__ import annotations

import argparse
from typing import Any

from volunteer.commands.daemon_call import ask_daemon, print_json
from volunteer.control.messages import LEADERBOARD, BoardRow
from volunteer.paths import Paths
from volunteer.transport.protocol import printable

LEADERBOARD_TIMEOUT_S = 30.0
HEADER = (
    f"{'rank':>4}  {'name':<20} {'peer id':<52} {'recent/day':>10} {'total':>10} "
    f"{'blocks':>7} {'uptime':>6} {'rep':>4}"
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "leaderboard",
        help="the servers ranked by verified credit, as this daemon audited them",
        description="One line per server whose credit summary passed this daemon's audit: "
        "rank, public name, peer id, recent average credit per day, total credit, blocks "
        "served, uptime share and reputation (your own row marked *). Credit held in "
        "escrow (a new identity without a record of checks) ranks after released credit.",
    )
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, paths: Paths) -> int:
    reply = ask_daemon(paths, LEADERBOARD, LEADERBOARD_TIMEOUT_S)
    if args.json:
        print_json(reply)
        return 0
    if not reply.rows:
        print("no audited servers yet: summaries are audited every few seconds after start")
        return 0
    print(HEADER)
    for row in reply.rows:
        print(line(row))
    return 0


def line(row: BoardRow) -> str:
    # Names come from peers: shown as plain text only.
    name = printable(row.public_name or "-", max_chars=20)
    blocks = f"{row.blocks[0]}:{row.blocks[1]}" if row.blocks else "-"
    mark = "*" if row.is_self else " "
    text = (
        f"{row.rank:>3}{mark}  {name:<20} {row.peer_id:<52} {row.recent_average:>10.2f} "
        f"{row.total:>10.2f} {blocks:>7} {row.uptime_share:>6.0%} {row.reputation:>4.2f}"
    )
    if row.forfeited:
        text += "  escrow forfeited (banned)"
    elif row.held:
        text += f"  {row.held:.2f} held in escrow"
    if row.dropped:  # an auditor's own words, about a peer's summary
        text += f"  (latest summary dropped: {printable(row.dropped, max_chars=100)})"
    return text
