"""Rich text for the dashboard and the swarm map: gauges, the blocks bar, the health map.

Pure functions of plain data, so the screens stay thin and the drawing is easy to test.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich.text import Text

from volunteer import settings
from volunteer.control.messages import RouteHop, SwarmReply

FULL, EMPTY = "█", "░"
BARS = " ▁▂▃▄▅▆▇█"


def gauge(label: str, fraction: float | None, detail: str, width: int = 24) -> Text:
    """`label ██████░░░░ detail`; an unknown fraction draws an empty bar and "?"."""
    text = Text(f"{label:<5}", style="bold")
    if fraction is None:
        text.append(EMPTY * width, style="dim")
        text.append(f" {detail or '?'}")
        return text
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    style = "green" if fraction < 0.6 else "yellow" if fraction < 0.85 else "red"
    text.append(FULL * filled, style=style)
    text.append(EMPTY * (width - filled), style="dim")
    text.append(f" {detail}")
    return text


def blocks_bar(served: Sequence[int] | None, total: int | None, width: int = 60) -> Text:
    """The model's blocks as a bar, the served span lit: `blocks 10:20 of 30`."""
    if not total:
        if served:
            return Text(f"blocks {served[0]}:{served[1]}", style="bold")
        return Text("no blocks served", style="dim")
    cells = min(total, width)
    text = Text()
    for cell in range(cells):
        first = cell * total // cells
        last = max(first + 1, (cell + 1) * total // cells)
        lit = served is not None and served[0] < last and first < served[1]
        text.append(FULL if lit else EMPTY, style="bold cyan" if lit else "dim")
    where = f"blocks {served[0]}:{served[1]} of {total}" if served else f"none of {total} blocks"
    text.append(f"  {where}")
    return text


def health_rows(swarm: SwarmReply) -> list[tuple[int, int, float, bool]]:
    """Per block: (index, servers online or joining, their total throughput, is weakest)."""
    total = swarm.num_blocks
    counts = [0] * total
    for server in swarm.servers:
        if server.state in ("online", "joining"):
            for index in range(max(server.start, 0), min(server.end, total)):
                counts[index] += 1
    throughput = list(swarm.block_throughput) or [0.0] * total
    weakest = min(throughput) if throughput else 0.0
    return [
        (index, counts[index], throughput[index], throughput[index] <= weakest)
        for index in range(total)
    ]


def health_map(swarm: SwarmReply) -> Text:
    """The model's blocks left to right, in groups of ten: how many servers hold each
    (a dot for none) and its total throughput as a bar relative to the strongest block;
    the weakest blocks in reverse video."""
    rows = health_rows(swarm)
    if not rows:
        return Text("the model's blocks are unknown yet", style="dim")
    strongest = max(row[2] for row in rows) or 1.0
    index_line, count_line, speed_line = Text("block   "), Text("servers "), Text("speed   ")
    for index, count, throughput, is_weakest in rows:
        share = throughput / strongest
        colour = "red" if count == 0 else "yellow" if share < 0.5 else "green"
        style = colour + (" reverse" if is_weakest else "")
        index_line.append(str(index // 10) if index % 10 == 0 else " ", style="dim")
        count_line.append("·" if count == 0 else str(min(count, 9)), style=f"bold {style}")
        level = 0 if count == 0 else max(1, round(share * (len(BARS) - 1)))
        speed_line.append(BARS[level], style=style)
        if (index + 1) % 10 == 0:
            for line in (index_line, count_line, speed_line):
                line.append(" ")
    weakest = [row for row in rows if row[3]]
    legend = Text(
        f"{len(rows)} blocks (tens marked above); weakest: "
        f"{_spans([row[0] for row in weakest])} at {weakest[0][2]:.3g} tokens/s; "
        f"strongest {strongest:.3g} tokens/s",
        style="dim",
    )
    return Text("\n").join([index_line, count_line, speed_line, legend])


def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 14 else f"{peer_id[:6]}…{peer_id[-6:]}"


def route_text(route: Sequence[RouteHop]) -> str:
    return " → ".join(f"{short_peer(h.peer_id)} {h.start}:{h.end}" for h in route)


def _spans(indices: list[int]) -> str:
    """[3, 4, 5, 9] -> "3:6, 9:10"."""
    parts, start = [], None
    for position, index in enumerate(indices):
        if start is None:
            start = index
        if position + 1 == len(indices) or indices[position + 1] != index + 1:
            parts.append(f"{start}:{index + 1}")
            start = None
    return ", ".join(parts)


def setting_label(name: str) -> str:
    """A settings field as the settings screen names it (declared with the setting)."""
    return settings.setting_label(name)
