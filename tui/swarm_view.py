"""The swarm's health map (as health.petals.dev): who holds each block, and the peers."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from volunteer.tui.render import health_map, short_peer

from volunteer.control.messages import SwarmReply

PEER_COLUMNS = ("name", "peer", "blocks", "tokens/s", "rtt ms", "version", "state")


class SwarmView(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("waiting for the daemon's view of the swarm…", id="health", markup=False)
        yield DataTable(id="peers", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#peers", DataTable).add_columns(*PEER_COLUMNS)

    def show_swarm(self, swarm: SwarmReply | None, error: str | None = None) -> None:
        health = self.query_one("#health", Static)
        table = self.query_one("#peers", DataTable)
        if swarm is None:
            health.update(f"no swarm to show: {error or 'no daemon is running'}")
            table.clear()
            return
        health.update(health_map(swarm))
        table.clear()
        for server in sorted(swarm.servers, key=lambda s: (s.start, s.peer_id)):
            rtt_s = server.rtt_s
            table.add_row(
                # Text, not str: the table reads a str as markup, and a stranger's name
                # like "[/]" would crash the view or "[@click=...]" bind an action.
                Text(server.public_name or "-"),
                short_peer(server.peer_id),
                f"{server.start}:{server.end}",
                f"{server.throughput:.1f}",
                "-" if rtt_s is None else f"{rtt_s * 1000:.1f}",
                server.version or "-",
                server.state,
                key=server.peer_id,
            )
