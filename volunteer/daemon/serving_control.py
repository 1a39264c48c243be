"""The block server's control methods: `swarm`, `pause` and `resume`; and pausing by the
owner's rules (`volunteer.daemon.rule_watch`).

A pause takes the server out of routes (OFFLINE) while its blocks stay loaded for a quick
resume. When it is the only server of some of its blocks, the pause waits for the
hand-over first (`volunteer.daemon.hand_over`): the reply comes at once, naming those
blocks, and the server goes OFFLINE once another one holds them or the grace runs out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from hivemind.p2p import PeerID

from volunteer.client.remote_span import ping
from volunteer.control.messages import (
    PAUSE,
    RESUME,
    SWARM,
    NoParams,
    PauseReply,
    SwarmParams,
    SwarmReply,
)
from volunteer.control.server import ControlServer
from volunteer.daemon.hand_over import hand_over, needs_hand_over
from volunteer.daemon.rule_watch import BY_YOU, RuleWatch
from volunteer.errors import VolunteerError
from volunteer.machine.owner_sensors import OwnerSensors
from volunteer.settings import Settings
from volunteer.swarm.dht_records import peer_id_from_owner
from volunteer.swarm.records import ServerState
from volunteer.transport.protocol import PeerUnavailableError, RemoteError

if TYPE_CHECKING:
    from volunteer.daemon.block_service import BlockService

logger = logging.getLogger(__name__)

PING_TIMEOUT_S = 5.0


class ServingControl:
    """The control methods of `service` (see the module doc)."""

    def __init__(self, service: BlockService, sensors: OwnerSensors) -> None:
        self._service = service
        self.paused_by: str | None = None
        """Who paused the server: "you", or the owner's rule that did (None: serving)."""
        self.rules = RuleWatch(self, sensors)
        self._switching = asyncio.Lock()
        """One pause or resume at a time: a rule's and the volunteer's may cross, and each
        waits on the network (the hand-over's first look)."""

    def register(self, control: ControlServer) -> None:
        control.register(SWARM, self._swarm)
        control.register(PAUSE, self._pause)
        control.register(RESUME, self._resume)

    @property
    def settings(self) -> Settings:
        return self._service.settings

    @property
    def is_serving(self) -> bool:
        return self._service.handler is not None and self._service.info is not None

    @property
    def is_paused(self) -> bool:
        handler = self._service.handler
        return handler is not None and handler.is_paused

    @property
    def is_pausing(self) -> bool:
        """Handing blocks over before a pause takes effect."""
        pausing = self._service.pausing
        return pausing is not None and not pausing.done()

    def describe_rules(self) -> str | None:
        """`status`' row for the owner's rules: what they say now and, under an upload
        cap, what it let through and held back."""
        said, handler = self.rules.describe(), self._service.handler
        mbps = self.settings.max_upload_mbps
        if said is None or handler is None or mbps is None:
            return said
        upload = handler.upload
        return (
            f"{said}; upload capped at {mbps:g} Mbit/s: {upload.sent_bytes / 1e6:.1f} MB "
            f"sent through p2p, replies held back {upload.waited_s:.0f} s in all"
        )

    async def _pause(self, params: NoParams) -> PauseReply:
        """Control method: stop taking new work (announced OFFLINE, so clients route
        elsewhere, after a hand-over where needed); open sessions finish."""
        return await self.set_paused(True, by=BY_YOU)

    async def _resume(self, params: NoParams) -> PauseReply:
        self.rules.override()  # the volunteer's word beats a rule that holds now
        return await self.set_paused(False, by=None)

    async def set_paused(self, is_paused: bool, *, by: str | None) -> PauseReply:
        """Pauses (`by` whom or which rule) or resumes the server."""
        async with self._switching:
            return await self._switch(is_paused, by)

    async def _switch(self, is_paused: bool, by: str | None) -> PauseReply:
        service = self._service
        if service.handler is None or service.info is None:
            raise VolunteerError("this daemon serves no blocks: nothing to pause or resume")
        pausing, service.pausing = service.pausing, None
        if pausing is not None:  # a resume, or a second pause, ends the hand-over
            pausing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await pausing
        self.paused_by = by if is_paused else None
        if is_paused and not service.handler.is_paused and service.settings.leave_grace_s > 0:
            alone = await needs_hand_over(service)
            if alone:
                service.pausing = asyncio.create_task(self._pause_after_hand_over(), name="pause")
                spans = [f"{start}:{end}" for start, end in alone]
                return PauseReply(paused=True, announced=True, handing_over=spans)
        return await self._apply(is_paused)

    async def _pause_after_hand_over(self) -> None:
        service = self._service
        try:
            await hand_over(service, service.settings.leave_grace_s, service.leave_now)
        except (VolunteerError, OSError) as exc:  # the pause still happens: only later
            logger.warning("handing the blocks over failed (%s): pausing now", exc)
        await self._apply(True)

    async def _apply(self, is_paused: bool) -> PauseReply:
        service = self._service
        handler, info = service.handler, service.info
        assert handler is not None and info is not None
        handler.is_paused = is_paused
        state = ServerState.OFFLINE if is_paused else ServerState.ONLINE
        service.info = info.model_copy(update={"state": state})
        announced = await service.announce(service.info)
        by = "the volunteer" if self.paused_by in (None, BY_YOU) else "the owner's rules"
        logger.info("%s by %s", "paused" if is_paused else "resumed", by)
        return PauseReply(paused=is_paused, announced=announced)

    async def _swarm(self, params: SwarmParams) -> SwarmReply:
        """Control method: who serves which block of this daemon's model, right now, and
        (with `{"ping": true}`) each serving peer's round trip from here (`rtt_s`, None
        when it did not answer)."""
        described = await self._service.describe_swarm()
        if params.is_ping:
            servers = [s for s in described["servers"] if s["state"] != ServerState.OFFLINE]
            rtts = await asyncio.gather(*(self._rtt_s(s["peer_id"]) for s in servers))
            for server, rtt_s in zip(servers, rtts, strict=True):
                server["rtt_s"] = rtt_s
        return SwarmReply.model_validate(described)

    async def _rtt_s(self, peer_id: str) -> float | None:
        service = self._service
        if peer_id == peer_id_from_owner(service.owner):
            return 0.0
        try:
            return await ping(service.p2p, PeerID.from_base58(peer_id), PING_TIMEOUT_S)
        except (PeerUnavailableError, RemoteError, ValueError):
            return None
