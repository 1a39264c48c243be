"""Who works in the driver's next step (`volunteer.training.driver`): failed peers that
answer again are brought to the current step from a peer of their stage, peers move
from fast to slow stages (`scheduler.training.rebalance_stages`) taking the stage's
state with them, and every peer hears the roster: whom to take shares and state
requests from.

A mixin of `Driver`, which owns the state these methods use.
"""

from __future__ import annotations

import asyncio
import logging

from hivemind.p2p import P2P

from volunteer.scheduler.training import StagePeer, rebalance_stages
from volunteer.training.calls import TrainingCallError
from volunteer.training.job import TrainingJob
from volunteer.training.step_types import PROBE_TIMEOUT_S, TrainingStalled

logger = logging.getLogger(__name__)


class Membership:
    """The membership half of `Driver` (see the module)."""

    p2p: P2P
    job: TrainingJob
    step: int
    members: dict[str, int]
    banned: dict[str, int]
    failed: set[str]
    rebalance: bool
    speeds: dict[str, float]
    stale: set[str]
    # Also the driver's: stage_peers, speed_prior, _ask, _call.

    async def _probe(self, peer: str) -> int | None:
        """The steps a failed peer has taken, or None while it does not answer (quietly:
        a dead peer is asked before every step until it leaves the DHT)."""
        try:
            answer, _ = await self._ask(
                peer, {"op": "info"}, timeout_s=PROBE_TIMEOUT_S, max_answer_bytes=4096
            )
        except TrainingCallError:
            return None
        steps = answer.get("steps")
        return steps if isinstance(steps, int) else None

    async def _sync(self, peer: str, stage: int, source: str | None, steps: int) -> bool:
        header = {"op": "sync", "stage": stage, "steps": steps, "source": source or ""}
        try:
            await self._call(peer, header, [])
        except TrainingCallError:
            return False
        self.members[peer] = stage
        return True

    # Between steps.

    async def _forget_step(self) -> None:
        """Has every peer drop what it summed in this step; one that does not say it
        did is out of the step (its old sums would make its share look like a lie)."""
        peers = [peer for peer in self.members if peer not in self.banned]
        forgot = await asyncio.gather(*(self._reset(peer) for peer in peers))
        self.failed.update(peer for peer, done in zip(peers, forgot, strict=True) if not done)

    async def _reset(self, peer: str) -> bool:
        header = {"op": "reset", "step": self.step}
        try:
            await self._ask(peer, header, timeout_s=PROBE_TIMEOUT_S, max_answer_bytes=4096)
        except TrainingCallError:
            return False
        return True

    async def _send_roster(self) -> None:
        """Tells every peer who the job's peers are (whom to take shares and state
        requests from); a peer that does not hear it is out of the step."""
        members = {p: s for p, s in self.members.items() if p not in self.banned}
        header = {"op": "roster", "members": members}
        replies = await asyncio.gather(
            *(self._ask(peer, header, timeout_s=PROBE_TIMEOUT_S, max_answer_bytes=4096)
              for peer in members),
            return_exceptions=True,
        )  # fmt: skip
        for peer, reply in zip(members, replies, strict=True):
            if isinstance(reply, BaseException):
                self.failed.add(peer)

    async def _prepare(self) -> None:
        """Brings back failed peers that answer, evens out the stages, and sends the
        roster."""
        await self._send_roster()  # a peer brought back takes the state of one named here
        failed = sorted(self.failed - set(self.banned))  # a banned peer is not brought back
        answers = await asyncio.gather(*(self._probe(peer) for peer in failed))
        for peer, steps in zip(failed, answers, strict=True):
            if steps is None:
                continue  # still gone: asked again before the next step
            stage = self.members[peer]
            source = next(iter(self.stage_peers(stage)), None)
            self.failed.discard(peer)
            if steps == self.step and peer not in self.stale:
                back = await self._reset(peer)  # it may hold sums of a step started over
            else:
                back = source is not None and await self._sync(peer, stage, source, self.step)
            if back:
                self.stale.discard(peer)
            else:
                self.failed.add(peer)
        if not self.rebalance:
            return
        load = [float(self.job.batch_size)] * len(self.job.stages)
        prior = self.speed_prior()
        live = [
            StagePeer(peer, self.members[peer], self.speeds.get(peer, prior))
            for stage in range(len(self.job.stages))
            for peer in self.stage_peers(stage)
        ]
        for move in rebalance_stages(load, live, max_moves=1):
            source = next(iter(self.stage_peers(move.to_stage)), None)
            if source is None and self.step:
                raise TrainingStalled(f"stage {move.to_stage} lost every peer and its state")
            if await self._sync(move.peer_id, move.to_stage, source, self.step):
                logger.info(
                    "moved %s from stage %d to %d", move.peer_id, move.from_stage, move.to_stage
                )
                await self._send_roster()  # its new stage takes its shares now
