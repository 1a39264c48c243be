"""Whether a block server should move to other blocks, and the move.

At randomised intervals (`next_check_delay_s`) the server asks the scheduler whether
moving would raise the swarm's weakest block enough (`should_move`, both in
`volunteer.scheduler.rebalancing`). If so, and the new blocks fit in free memory next
to the old ones (they load before the old ones go), it loads them and has the block
service serve them (`BlockService.serve_moved`). Only servers whose span was not set
with `--blocks` rebalance.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from typing import TYPE_CHECKING

from volunteer.daemon.ram_room import ram_room
from volunteer.daemon.span_plan import block_footprint
from volunteer.errors import VolunteerError
from volunteer.models.errors import ModelError
from volunteer.scheduler.block_selection import ServerSpan
from volunteer.scheduler.rebalancing import MoveDecision, next_check_delay_s, should_move
from volunteer.swarm.dht_records import peer_id_from_owner
from volunteer.swarm.records import ServerState

if TYPE_CHECKING:
    from volunteer.daemon.block_service import BlockService

logger = logging.getLogger(__name__)

MOVE_MEMORY_MARGIN = 1.2
"""Free memory needed to move, relative to the new blocks' weights."""


class Rebalancer:
    """Checks now and then whether `service` should serve other blocks, and moves it.

    Args:
        service: the block service, serving.
        rng: randomises tie-breaks and check intervals (seeded by the caller in tests).
    """

    def __init__(self, service: BlockService, *, rng: random.Random) -> None:
        self._service = service
        self._rng = rng
        self.is_moving = False
        """Loading the blocks it moves to."""
        self.moves = 0
        self.last_check: MoveDecision | None = None

    async def run(self) -> None:
        """Checks at randomised intervals until cancelled."""
        period_s = self._service.settings.rebalance_period_s
        while True:
            await asyncio.sleep(next_check_delay_s(self._rng, period_s))
            try:
                await self.check()
            except (TimeoutError, VolunteerError, ModelError, OSError) as exc:
                # A DHT hiccup or a failed load: keep serving the current span.
                logger.warning("rebalance check failed: %s", exc)

    async def check(self) -> MoveDecision | None:
        """Asks the scheduler whether to move, and moves if so; None when the server is
        paused or not in the swarm's records (yet)."""
        service = self._service
        handler, info, model = service.handler, service.info, service.model
        if handler is None or info is None or model is None or handler.is_paused:
            return None
        if self.is_moving or info.state is not ServerState.ONLINE:
            return None  # a hole move under way, or handing its blocks over
        snapshot = await service.placement_snapshot()
        me = peer_id_from_owner(service.owner)
        spans = [s for s in snapshot.server_spans() if s.peer_id != me]
        # Capped like everyone else's claim, so the comparison is like for like.
        own = ServerSpan(me, info.start, info.end, min(info.throughput, snapshot.claim_cap()))
        decision = await asyncio.to_thread(
            should_move, [*spans, own], me, model.config.num_layers, self._rng
        )
        if decision.should_move and (shortfall := self.memory_shortfall(info.end - info.start)):
            decision = dataclasses.replace(
                decision,
                should_move=False,
                start=info.start,
                reason=f"staying: moving would help, but {shortfall}",
            )
        self.last_check = decision
        logger.info("rebalance check: %s", decision.reason)
        if decision.should_move:
            await self.move_to(decision.start, decision.reason)
        return decision

    def memory_shortfall(self, length: int) -> str | None:
        """Why `length` blocks cannot be loaded beside the served ones now (None: they
        can): a move loads the new blocks before it frees the old."""
        model = self._service.model
        assert model is not None
        needed = length * block_footprint(model.config, self._service.fmt).weight_bytes
        room = ram_room(self._service.settings)
        if room.available_bytes >= needed * MOVE_MEMORY_MARGIN:
            return None
        return (
            f"loading the new blocks first needs {needed / 2**30:.2f} GiB "
            f"and {room.available_bytes / 2**30:.2f} GiB is free"
            + (f" ({room.note})" if room.note else "")
        )

    async def move_to(self, start: int, reason: str, *, is_announced: bool = False) -> bool:
        """Loads the blocks from `start` (as many as served now) and serves them instead;
        False when another move is under way (the periodic check and a hole move race).

        Args:
            is_announced: first say JOINING on the new blocks, so that servers taking
                turns at a hole see it is being filled (`volunteer.daemon.hole_watch`);
                if loading fails, they are announced OFFLINE again.
        """
        service, info = self._service, self._service.info
        assert info is not None
        if self.is_moving:
            return False
        end = start + info.end - info.start
        fresh = [i for i in range(start, end) if not info.start <= i < info.end]
        blocks = range(fresh[0], fresh[-1] + 1) if fresh else None
        self.is_moving = True
        try:
            if is_announced and blocks is not None:
                joining = {"state": ServerState.JOINING, "start": start, "end": end}
                await service.announce(info.model_copy(update=joining), blocks=blocks)
            try:
                span = await service.load_span(start, end)
            except BaseException:
                if is_announced and blocks is not None:
                    offline = {"state": ServerState.OFFLINE, "start": start, "end": end}
                    await service.announce(info.model_copy(update=offline), blocks=blocks)
                raise
            await service.serve_moved(span, reason)
            self.moves += 1
        finally:
            self.is_moving = False
        return True
