"""How much RAM the daemon may take on now: what is free, within the owner's RAM cap.

The cap (`max_ram_percent_in_use`, or `_idle` where that is off) is a share of the
machine's RAM for everything the daemon holds; what it may still take is that share less
what it holds already. Blocks are planned, and moved, within the cap that applies while the
machine is in use, the stricter, so that the owner coming back finds the weights within it
(`volunteer.daemon.rule_watch` pauses for what grows past it: the sessions' caches).
"""

from __future__ import annotations

import dataclasses

import psutil

from volunteer.daemon.rule_watch import rules_of
from volunteer.machine.owner_sensors import tree_rss_bytes
from volunteer.settings import Settings

GIB = 1 << 30


@dataclasses.dataclass(frozen=True)
class RamRoom:
    available_bytes: int
    """What the daemon may take on now."""
    note: str | None
    """How the owner's cap bounds it, in words (None: no cap, or it does not bind)."""


def ram_room(settings: Settings, process: psutil.Process | None = None) -> RamRoom:
    """Free RAM now, within the owner's cap for `process` (default: this one) and its
    children."""
    memory = psutil.virtual_memory()
    return room_within_cap(
        settings,
        free_bytes=int(memory.available),
        total_bytes=int(memory.total),
        held_bytes=tree_rss_bytes(process or psutil.Process()),
    )


def room_within_cap(
    settings: Settings, *, free_bytes: int, total_bytes: int, held_bytes: int
) -> RamRoom:
    cap = rules_of(settings).ram_cap_percent(active=True)
    if cap is None:
        return RamRoom(free_bytes, None)
    room = max(int(total_bytes * cap / 100) - held_bytes, 0)
    if room >= free_bytes:
        return RamRoom(free_bytes, None)
    return RamRoom(
        room,
        f"the owner's RAM cap of {cap:g}% ({total_bytes * cap / 100 / GIB:.2f} GiB) leaves "
        f"{room / GIB:.2f} GiB beside the {held_bytes / GIB:.2f} GiB the daemon holds",
    )
