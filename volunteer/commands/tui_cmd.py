"""`volunteer tui`: the terminal dashboard (the Textual app in `tui/`)."""

from __future__ import annotations

import argparse
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
    from tui.app import VolunteerApp
    from tui.client import ControlDaemonClient
    from tui.gauges import GaugeReader

    home = Path(args.home).expanduser().resolve() if args.home else None
    client = ControlDaemonClient(paths, home=home)
    VolunteerApp(client, gauges=GaugeReader(paths.cache_dir)).run()
    return 0
