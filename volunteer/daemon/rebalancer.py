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

import psutil

from volunteer.daemon.span_plan import block_footprint
from volunteer.errors import VolunteerError
from volunteer.models.errors import ModelError
from volunteer.scheduler.block_selection import ServerSpan
from volunteer.scheduler.rebalancing import MoveDecision, next_check_delay_s, should_move
from volunteer.swarm.dht_records import peer_id_from_owner

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
        snapshot = await service.placement_snapshot()
        me = peer_id_from_owner(service.owner)
        spans = [s for s in snapshot.server_spans() if s.peer_id != me]
        # Capped like everyone else's claim, so the comparison is like for like.
        own = ServerSpan(me, info.start, info.end, min(info.throughput, snapshot.claim_cap()))
        decision = await asyncio.to_thread(
            should_move, [*spans, own], me, model.config.num_layers, self._rng
        )
        if decision.should_move:
            needed = (info.end - info.start) * block_footprint(model.config).weight_bytes
            available = psutil.virtual_memory().available
            if available < needed * MOVE_MEMORY_MARGIN:
                decision = dataclasses.replace(
                    decision,
                    should_move=False,
                    start=info.start,
                    reason=f"staying: moving would help, but loading the new blocks first "
                    f"needs {needed / 2**30:.2f} GiB and {available / 2**30:.2f} GiB is free",
                )
        self.last_check = decision
        logger.info("rebalance check: %s", decision.reason)
        if decision.should_move:
            await self._move(decision, length=info.end - info.start)
        return decision

    async def _move(self, decision: MoveDecision, *, length: int) -> None:
        self.is_moving = True
        try:
            span = await self._service.load_span(decision.start, decision.start + length)
            await self._service.serve_moved(span, decision.reason)
            self.moves += 1
        finally:
            self.is_moving = False
