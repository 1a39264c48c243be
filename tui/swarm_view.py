"""The swarm's health map (as health.petals.dev): who holds each block, and the peers."""

from __future__ import annotations

from rich.text import Text
from textual.app import ComposeResult
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from volunteer.tui.render import health_map, short_peer

from volunteer.control.messages import PeerReport, PeersReply, SwarmReply

PEER_COLUMNS = (
    "name",
    "peer",
    "blocks",
    "tokens/s",
    "rtt ms",
    "version",
    "state",
    "standing",
    "checks ✓/✗",
)


class SwarmView(Vertical):
    def compose(self) -> ComposeResult:
        yield Static("waiting for the daemon's view of the swarm…", id="health", markup=False)
        yield DataTable(id="peers", zebra_stripes=True, cursor_type="row")

    def on_mount(self) -> None:
        self.query_one("#peers", DataTable).add_columns(*PEER_COLUMNS)

    def show_swarm(
        self, swarm: SwarmReply | None, error: str | None = None, peers: PeersReply | None = None
    ) -> None:
        health = self.query_one("#health", Static)
        table = self.query_one("#peers", DataTable)
        if swarm is None:
            health.update(f"no swarm to show: {error or 'no daemon is running'}")
            table.clear()
            return
        health.update(health_map(swarm))
        table.clear()
        checked = {peer.peer_id: peer for peer in peers.peers} if peers is not None else {}
        for server in sorted(swarm.servers, key=lambda s: (s.start, s.peer_id)):
            rtt_s = server.rtt_s
            report = checked.get(server.peer_id)
            table.add_row(
                # Text, not str: the table reads a str as markup, and a stranger's name
                # like "[/]" would crash the view or "[@click=...]" bind an action.
                Text(server.public_name or "-"),
                short_peer(server.peer_id),
                f"{server.start}:{server.end}",
                f"{server.throughput:.1f}",
                "-" if rtt_s is None else f"{rtt_s * 1000:.1f}",
                server.version or "-",
                _state(server.state, report),
                "-" if report is None else f"{report.standing:.2f}",
                "-" if report is None else f"{report.passed}/{report.failed}",
                key=server.peer_id,
            )


def _state(state: str, report: PeerReport | None) -> str | Text:
    """The record's state (one of three words, checked when read), or "banned" and why
    (words that came from a peer: shown as plain text, never as markup)."""
    if report is None or report.banned_until_s is None:
        return state
    return Text(f"banned: {report.ban_reason or 'failed a check'}", style="bold red")
