"""`volunteer peers`: the peers the local daemon knows, with what its checks found."""

from __future__ import annotations

import argparse
import time
from typing import Any

from volunteer.commands.daemon_call import ask_daemon, print_json
from volunteer.control.messages import PEERS, PeerReport
from volunteer.paths import Paths
from volunteer.transport.protocol import printable

PEERS_TIMEOUT_S = 30.0


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "peers",
        help="the peers the daemon knows: blocks, checks passed and failed, bans",
        description="One line per peer: id, name, blocks, standing (0 to 1), checks passed "
        "and failed, and 'banned' with why and until when.",
    )
    parser.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, paths: Paths) -> int:
    reply = ask_daemon(paths, PEERS, PEERS_TIMEOUT_S)
    if args.json:
        print_json(reply)
        return 0
    if not reply.peers:
        print("no peers known yet")
    for peer in reply.peers:
        print(_line(peer))
    return 0


def _line(peer: PeerReport) -> str:
    # Names and reasons come from peers: shown as plain text only.
    name = printable(peer.public_name or "-", max_chars=24)
    blocks = f"{peer.blocks[0]}:{peer.blocks[1]}" if peer.blocks else "-"
    line = (
        f"{peer.peer_id}  {name:<24} {blocks:>7}  standing {peer.standing:.2f}  "
        f"checks {peer.passed} passed, {peer.failed} failed"
    )
    if peer.banned_until_s is not None:
        until = time.strftime("%Y-%m-%d %H:%M", time.localtime(peer.banned_until_s))
        line += f"  banned until {until}: {printable(peer.ban_reason or '', max_chars=200)}"
    return line
