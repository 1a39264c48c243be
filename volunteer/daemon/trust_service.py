"""The daemon's record of the peers it checked (`volunteer.trust.reputation`), shared by
its chats, shown by `volunteer peers` and `status`.

The record is a SQLite file in the data folder. One that cannot be opened (another
program's file, a full disk) is logged and replaced by a record in memory for this run:
the daemon keeps serving and checking, and the file is left as it was.
"""

from __future__ import annotations

import asyncio
import logging
import time

from volunteer.control.messages import PEERS, NoParams, PeerReport, PeersReply, TrustStatus
from volunteer.control.server import ControlServer
from volunteer.daemon.accusation_service import AccusationService
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.local_checks import open_reputation
from volunteer.daemon.validator import Validator
from volunteer.paths import Paths
from volunteer.scheduler.verification import standing
from volunteer.settings import Settings
from volunteer.training.evidence import TrainingEvidence
from volunteer.trust.evidence import Evidence
from volunteer.trust.reputation import PeerStanding, Reputation, ReputationStoreError

logger = logging.getLogger(__name__)


class TrustService:
    """Owns this daemon's `Reputation` and its accusations from start to stop."""

    def __init__(
        self,
        paths: Paths,
        blocks: BlockService,
        *,
        dht: DHTService | None = None,
        owner: bytes = b"",
        settings: Settings | None = None,
    ) -> None:
        """Without `dht`, it keeps the record only: it files and judges no accusations,
        and validates nothing."""
        self._paths = paths
        self._blocks = blocks
        self.reputation = Reputation()
        """In memory until `start` opens the file."""
        self.accusations: AccusationService | None = None
        self.validator: Validator | None = None
        if dht is not None:
            self.accusations = AccusationService(dht, blocks, lambda: self.reputation, owner=owner)
            settings = settings or Settings()
            self.validator = Validator(
                dht,
                blocks,
                lambda: self.reputation,
                self.accusations,
                share=settings.validate_share,
                faults=settings.faults,
            )

    async def start(self) -> None:
        try:
            self.reputation = await asyncio.to_thread(open_reputation, self._paths)
        except ReputationStoreError as exc:
            logger.error("%s; this run keeps its record of checks in memory only", exc)
        if self.accusations is not None:
            await self.accusations.start()
        if self.validator is not None:
            self.validator.start()

    async def stop(self) -> None:
        if self.validator is not None:
            await self.validator.stop()
        if self.accusations is not None:
            await self.accusations.stop()
        self.reputation.close()

    def accuse(self, peer_id: str, evidence: Evidence, reason: str) -> None:
        """Publishes a proven wrong output (the checks' `Verifier.accuse`)."""
        if self.accusations is not None:
            self.accusations.accuse(peer_id, evidence, reason)

    def accuse_training(self, peer_id: str, evidence: TrainingEvidence, reason: str) -> None:
        """Publishes a training peer's proven wrong work (a validator's, `TrainingPeer`)."""
        if self.accusations is not None:
            self.accusations.accuse_training(peer_id, evidence, reason)

    def status(self) -> TrustStatus:
        now = time.time()
        peers = list(self.reputation)
        accusations = self.accusations
        return TrustStatus(
            peers_checked=len(peers),
            peers_banned=sum(p.is_banned(now) for p in peers),
            checks_passed=sum(p.passed for p in peers),
            checks_failed=sum(p.failed for p in peers),
            accusations_filed=accusations.filed if accusations else 0,
            accusations_upheld=accusations.verified if accusations else 0,
            accusations_refuted=accusations.refuted if accusations else 0,
        )

    def register_control(self, control: ControlServer) -> None:
        """Adds the control method `peers`."""
        control.register(PEERS, self._peers)

    async def _peers(self, params: NoParams) -> PeersReply:
        """Control method: every server of the model's records and every peer checked,
        with its blocks, name, checks and ban."""
        reports: dict[str, PeerReport] = {}
        try:
            servers = (await self._blocks.describe_swarm())["servers"]
        except Exception as exc:  # a partitioned daemon still shows what it checked
            logger.info("peers: the swarm's records could not be read: %s", exc)
            servers = []
        for server in servers:
            peer_id = server["peer_id"]
            reports[peer_id] = _report(
                self.reputation.of(peer_id),
                public_name=server.get("public_name"),
                blocks=(server["start"], server["end"]),
                state=server.get("state"),
            )
        for each in self.reputation:
            if each.peer_id not in reports:
                reports[each.peer_id] = _report(each)
        return PeersReply(peers=sorted(reports.values(), key=_order))


def _report(each: PeerStanding, **record: object) -> PeerReport:
    is_banned = each.is_banned(time.time())
    return PeerReport(
        peer_id=each.peer_id,
        standing=round(standing(each.record), 3),
        passed=each.passed,
        failed=each.failed,
        banned_until_s=each.banned_until_s if is_banned else None,
        ban_reason=each.ban_reason if is_banned else None,
        **record,  # type: ignore[arg-type]  # the record's fields, checked by the model
    )


def _order(report: PeerReport) -> tuple:
    return (report.blocks or (10**9, 10**9), -report.standing, report.peer_id)
