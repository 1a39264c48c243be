"""`volunteer tui`: the terminal dashboard (the Textual app in `tui/`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from volunteer.paths import Paths


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "tui",
        help="open the dashboard: contribution, chat, swarm map, log",
        description="A terminal window on the daemon: what it serves, live gauges, chat "
        "with the swarm's model, the swarm's health map and the daemon's log. Keys are "
        "shown at the bottom; q quits (the daemon keeps running).",
    )
    parser.set_defaults(handler=run_tui)


def run_tui(args: argparse.Namespace, paths: Paths) -> int:
    # Imported here: the rest of the CLI must not pay for Textual (and the TUI must not
    # pay for torch, which nothing on this path imports).
    from volunteer.chat.store import ChatStore, ChatStoreError, default_path
    from volunteer.tui.app import VolunteerApp
    from volunteer.tui.chat_history import ChatHistory
    from volunteer.tui.client import ControlDaemonClient
    from volunteer.tui.gauges import GaugeReader

    home = Path(args.home).expanduser().resolve() if args.home else None
    client = ControlDaemonClient(paths, home=home)
    try:
        store = ChatStore.open(default_path(paths))
    except ChatStoreError as exc:  # chat still works, it is just not saved
        print(f"volunteer: warning: chats will not be saved: {exc}", file=sys.stderr)
        store = None
    history = ChatHistory(store) if store is not None else None
    try:
        VolunteerApp(client, gauges=GaugeReader(paths.cache_dir), history=history).run()
    finally:
        if store is not None:
            store.close()
    return 0
