"""Leaving without leaving a hole: the hand-over of blocks no other server holds.

A server that stops or pauses while it is the only live server of some of its blocks
announces LEAVING instead of going at once. Clients then route through it only where no
other server can, servers that could fill the coming hole do so
(`volunteer.daemon.hole_watch`), and it keeps serving meanwhile: open sessions go on. It
leaves once every block of its span has another server that answers a ping, when the
grace (`leave_grace_s`) runs out, or when its volunteer insists (`volunteer stop --now`,
a second stop or signal). Sessions still open then fail over to the new servers, which
the clients' replay makes seamless.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

from volunteer.daemon.liveness import MAX_PINGS
from volunteer.scheduler.holes import Span, coverage, hole_move, holes
from volunteer.swarm.dht_records import peer_id_from_owner
from volunteer.swarm.records import ServerState, SwarmSnapshot

if TYPE_CHECKING:
    from volunteer.daemon.block_service import BlockService

logger = logging.getLogger(__name__)

LOOK_S = 1.0
"""Time between looks whether the blocks are covered by others yet."""


async def hand_over(service: BlockService, grace_s: float, hurry: asyncio.Event) -> None:
    """Keeps serving, announced LEAVING, until the served blocks are covered by others
    (see the module doc); returns at once when they already are, or `grace_s` is 0."""
    info = service.info
    if grace_s <= 0 or info is None or hurry.is_set():
        return
    deadline = time.monotonic() + grace_s
    alone = await needs_hand_over(service)
    if not alone:
        return
    service.info = info.model_copy(update={"state": ServerState.LEAVING})
    await service.announce(service.info)
    logger.info(
        "leaving: blocks %s have no other server; serving them until another server "
        "takes them over (at most %.0f s; `volunteer stop --now` leaves at once)",
        _spans(alone), grace_s,
    )  # fmt: skip
    while alone:
        left_s = deadline - time.monotonic()
        if left_s <= 0 or hurry.is_set():
            why = "asked to leave now" if hurry.is_set() else f"no server came in {grace_s:.0f} s"
            logger.warning("leaving blocks %s unserved: %s", _spans(alone), why)
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), timeout=min(LOOK_S, left_s))
        alone = await unserved_without_me(service)
    logger.info("handed over: every served block has another server")


async def needs_hand_over(service: BlockService) -> list[Span]:
    """The runs of the served blocks that no other live server holds, where some other
    server could take them (none: leaving at once loses nothing, or waiting would not
    help, e.g. in a swarm of one)."""
    snapshot, alone = await _survey(service)
    if not alone:
        return []
    me, dead = peer_id_from_owner(service.owner), service.liveness.dead
    spans = [
        (record.start, record.end)
        for peer_id, record in snapshot.spans().items()
        if peer_id != me and record.state is ServerState.ONLINE and peer_id not in dead
    ]
    counts = coverage(spans, len(snapshot.blocks))
    for start, end in alone:  # held only by peers that are gone
        counts[start:end] = [0] * (end - start)
    if any(hole_move(counts, span) is not None for span in spans):
        return alone
    logger.info("no other server could take blocks %s: leaving at once", _spans(alone))
    return []


async def unserved_without_me(service: BlockService) -> list[Span]:
    """The runs of the served blocks that no other live server holds: ONLINE records
    of peers that are there (`volunteer.daemon.liveness`)."""
    return (await _survey(service))[1]


async def _survey(service: BlockService) -> tuple[SwarmSnapshot, list[Span]]:
    info = service.info
    snapshot = await service.placement_snapshot()
    if info is None:
        return snapshot, []
    me, liveness = peer_id_from_owner(service.owner), service.liveness
    liveness.forget_old()
    # Blocks left unknown once the pings are spent count as unserved: waiting for a
    # hand-over is the safe side, and the grace bounds it.
    budget = liveness.pings + MAX_PINGS
    counts = []
    for servers in snapshot.blocks[info.start : info.end]:
        others = [p for p, r in servers.items() if p != me and r.state is ServerState.ONLINE]
        counts.append(int(await liveness.first_alive(others, max_pings=budget)))
    return snapshot, [(info.start + start, info.start + end) for start, end in holes(counts)]


def _spans(runs: list[Span]) -> str:
    return ", ".join(f"{start}:{end}" for start, end in runs)
