"""Watching the swarm for holes (blocks no live server covers) and filling them.

Every `HOLE_LOOK_S` a server that may move reads the swarm's records. A block is
covered by the ONLINE records of live servers, and for a while by a server that is moving
to it (JOINING: it is loading the block). LEAVING servers (handing their blocks over
before they stop, `volunteer.daemon.hand_over`) and OFFLINE ones do not cover; a server
that was SIGKILLed leaves ONLINE records behind until they expire, so each block needs an
online server that answered a ping lately, and one that misses two in a row counts as
dead (`volunteer.daemon.liveness`).

When there is a hole, the servers that could fill it take turns (the order and the move
come from `volunteer.scheduler.holes`): each waits `TURN_S` per server before it, looks
again, and moves if the hole is still open, saying JOINING first so the next ones see it
being filled. Bounds, with the default settings:

- a clean stop (LEAVING or OFFLINE announced) is seen within `HOLE_LOOK_S` (+10%);
- a crash of the last live server of some blocks within that plus `liveness.ALIVE_FOR_S`
  and two pings (`PROBE_TIMEOUT_S` each, `PROBE_RETRY_S` apart): within 16 s, mostly far
  less (a dead peer on loopback or a LAN refuses the connection at once);
- then `TURN_S` per server ahead in the order (0 for the first), and the load.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from volunteer.daemon.liveness import MAX_PINGS
from volunteer.errors import VolunteerError
from volunteer.models.errors import ModelError
from volunteer.scheduler.holes import Span, hole_move, holes, turn_order
from volunteer.swarm.dht_records import peer_id_from_owner
from volunteer.swarm.records import ServerState, SwarmSnapshot

if TYPE_CHECKING:
    from volunteer.daemon.block_service import BlockService

logger = logging.getLogger(__name__)

HOLE_LOOK_S = 2.0
"""Time between looks at the swarm's records (each one randomised by ±10%)."""
TURN_S = 4.0
"""Time each server ahead in the turn order has to start filling a hole. Longer than a
look (+10%), so that a server that saw the hole one look later than the one ahead of it
still sees that one's JOINING records at its turn."""
JOINING_TRUST_S = 60.0
"""How long a JOINING record counts as covering its blocks: a peer that says it is
loading them and never comes online must not hold a hole open for long."""


class HoleWatch:
    """Looks for holes in the swarm and moves `service` to fill one when it is its turn.

    Args:
        service: the block service, serving, with a rebalancer (which makes the move).
        rng: randomises the looks' intervals (seeded by the caller in tests).
        clock: monotonic seconds (for the JOINING records' age).
    """

    def __init__(
        self,
        service: BlockService,
        *,
        rng: random.Random,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._service = service
        self._rng = rng
        self._clock = clock
        self._joining: dict[tuple[str, int, int], float] = {}
        """When each JOINING record (peer, start, end) was first seen."""
        self.hole: Span | None = None
        """The first hole seen at the last look (None: none)."""
        self.moves = 0
        self._noted: Span | None = None

    async def run(self) -> None:
        """Looks at the swarm until cancelled."""
        while True:
            await asyncio.sleep(HOLE_LOOK_S * self._rng.uniform(0.9, 1.1))
            try:
                await self.look()
            except (TimeoutError, VolunteerError, ModelError, OSError) as exc:
                # A DHT hiccup or a failed load: keep serving the current span.
                logger.warning("looking for holes failed: %s", exc)

    async def look(self) -> None:
        """One look: finds the first hole, waits for this server's turn at it, and
        fills it if it is still open then."""
        service, rebalancer = self._service, self._service.rebalancer
        handler, info = service.handler, service.info
        if handler is None or info is None or rebalancer is None:
            return
        if handler.is_paused or rebalancer.is_moving or info.state is not ServerState.ONLINE:
            return  # paused, moving, or handing its blocks over before it pauses
        snapshot = await service.placement_snapshot()
        await self._probe(snapshot)
        counts, spans = self.coverage(snapshot)
        runs = holes(counts)
        self.hole = runs[0] if runs else None
        if self.hole is None:
            return
        hole = self.hole
        me = peer_id_from_owner(service.owner)
        helpers = [p for p, span in spans.items() if hole_move(counts, span) is not None]
        order = turn_order(helpers, hole)
        if me not in order:
            if self._noted != hole:
                self._noted = hole
                logger.info(
                    "blocks %d:%d have no server; this one cannot fill them without "
                    "leaving blocks of its own unserved", *hole,
                )  # fmt: skip
            return
        rank = order.index(me)
        logger.info(
            "blocks %d:%d have no server; filling them is this server's turn in %.0f s "
            "(%d of %d that could)", *hole, rank * TURN_S, rank + 1, len(order),
        )  # fmt: skip
        await asyncio.sleep(rank * TURN_S)
        await self._fill(hole)

    async def _fill(self, hole: Span) -> None:
        service, rebalancer, info = self._service, self._service.rebalancer, self._service.info
        if rebalancer is None or info is None or rebalancer.is_moving:
            return
        counts, _ = self.coverage(await service.placement_snapshot())
        target = hole_move(counts, (info.start, info.end))
        if target is None:
            logger.info("blocks %d:%d are being filled by another server", *hole)
            return
        length = info.end - info.start
        if shortfall := rebalancer.memory_shortfall(length):
            logger.warning("cannot fill blocks %d:%d: %s", *hole, shortfall)
            return
        reason = f"filling a hole: blocks {hole[0]}:{hole[1]} had no server"
        logger.info("hole move to blocks %d:%d (%s)", target, target + length, reason)
        if await rebalancer.move_to(target, reason, is_announced=True):
            self.moves += 1

    def coverage(self, snapshot: SwarmSnapshot) -> tuple[list[int], dict[str, Span]]:
        """Live servers per block (see the module doc), and the span of each online
        server not counted dead."""
        now, dead = self._clock(), self._service.liveness.dead
        spans = {
            peer_id: (info.start, info.end)
            for peer_id, info in snapshot.spans().items()
            if info.state is ServerState.ONLINE and peer_id not in dead
        }
        counts = [0] * len(snapshot.blocks)
        seen: dict[tuple[str, int, int], float] = {}
        for index, servers in enumerate(snapshot.blocks):
            for peer_id, info in servers.items():
                if peer_id not in spans:
                    continue
                if info.state is ServerState.ONLINE:
                    counts[index] += 1
                elif info.state is ServerState.JOINING:
                    # Only a server online elsewhere moves: a fresh peer's JOINING is
                    # not trusted at all (a free way to hold holes open).
                    key = (peer_id, info.start, info.end)
                    seen[key] = self._joining.get(key, now)
                    if now - seen[key] < JOINING_TRUST_S:
                        counts[index] += 1
        self._joining = seen
        return counts, spans

    async def _probe(self, snapshot: SwarmSnapshot) -> None:
        """Makes sure each block has an online server that is there (`Liveness`): a dead
        one's ONLINE records outlive it, and would hide its hole until they expire."""
        me = peer_id_from_owner(self._service.owner)
        liveness = self._service.liveness
        liveness.forget_old()
        budget = liveness.pings + MAX_PINGS  # a large swarm is checked over several looks
        for servers in snapshot.blocks:
            online = [p for p, i in servers.items() if i.state is ServerState.ONLINE]
            if me not in online:
                await liveness.first_alive(online, max_pings=budget)
