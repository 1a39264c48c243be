"""A daemon's part in swarm-wide bans: it files its own accusations, serves their
evidence, and judges every other peer's (`volunteer.trust.accusations`).

Judging an accusation, as BTARD does: fetch the evidence from the accuser, check that
the accused signed exactly those steps (`Evidence.checked_certificate`), and recompute
them on blocks this daemon computes itself (`local_checks.local_blocks`):

- the claimed output is wrong: the accused is banned here, and this daemon files the
  same evidence as its own accusation (an endorsement others may count);
- the claimed output is right, or the evidence does not hold: the accusation was
  false, and the accuser is banned here instead (a false accusation costs the
  accuser its standing);
- this daemon cannot compute the blocks (too large to load just to check): it bans the
  accused only once `QUORUM` accusers it deems reputable (`REPUTABLE_STANDING`, from
  its own checks of them) have accused it with evidence that holds.

Accusations of training peers (kind "training": a validator's evidence of a wrong
share or answer, `volunteer.training.evidence`) are judged the same way, recomputed on
a stage of the model built here (`training_judging`): a peer that cheats in training is
banned for serving too, and a false accuser loses its standing.

Accusations are read every `POLL_S`, judged one per accuser per round and each piece
of evidence once (whoever else files it): a flood of keys slows its own judging, and
one proof bans once. Evidence over this daemon's limits, older than
`EVIDENCE_MAX_AGE_S`, or whose recomputation is not finite is not judged: nobody is
banned for what this daemon cannot decide. An accuser that does not hand over its
evidence is asked again `FETCH_ATTEMPTS` times at most. Nothing here ever bans this
daemon's own peer id.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import torch

from volunteer.client.verification import replay_steps
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.local_checks import local_blocks
from volunteer.daemon.training_judging import training_verdict
from volunteer.scheduler.verification import standing
from volunteer.training.evidence import TrainingEvidence
from volunteer.trust.accusations import (
    MAX_PER_ACCUSER,
    Accusation,
    publish_on_node,
    read_on_node,
)
from volunteer.trust.evidence import (
    MAX_EVIDENCE_BYTES,
    CannotRecomputeError,
    Evidence,
    EvidenceError,
    EvidenceLimitError,
    UndecidableError,
    is_wrong,
)
from volunteer.trust.evidence_exchange import (
    EVIDENCE_HANDLE,
    EvidenceFetchError,
    EvidenceStore,
    fetch_evidence,
)
from volunteer.trust.reputation import Reputation
from volunteer.trust.tolerance import tolerance_for_format

POLL_S = 5.0
FETCH_TIMEOUT_S = 30.0
FETCH_ATTEMPTS = 3
MAX_PER_ROUND = 8
"""Accusations judged per round, the best-standing accusers first: a flood of them
(each key the DHT lets in holds 6) slows its own judging, not the honest ones'."""
MAX_FETCHES = 4
"""Evidence fetched at once (recomputed one at a time)."""
MAX_REPLAY_POSITIONS = 1 << 16
"""The most positions (batch x length) a replay allocates a cache for."""
DHT_TIMEOUT_S = 10.0
QUORUM = 2
REPUTABLE_STANDING = 0.75
"""Standing (`scheduler.verification.standing`) of an accuser whose word counts toward
`QUORUM`: about twenty passed checks here and no failed one."""
QUORUM_WINDOW_S = 3600.0
"""How long an accuser's word counts toward a quorum."""
EVIDENCE_MAX_AGE_S = 6 * 3600.0
"""Evidence of a session opened longer ago is not judged: a fault is punished once,
not replayed by new accusers for ever."""
MAX_OWN = 3
"""This daemon's own accusations kept published, before the endorsements (its record
holds `trust.accusations.MAX_PER_ACCUSER`)."""
MAX_JUDGED = 4096
ENDORSED = "recomputed an accusation of this peer, and found it true"
"""The reason of an endorsement: this daemon's own words, not the accuser's."""

logger = logging.getLogger(__name__)


class AccusationService:
    """Files, serves and judges accusations for a daemon (see the module)."""

    def __init__(
        self,
        dht: DHTService,
        blocks: BlockService,
        reputation: Callable[[], Reputation],
        *,
        owner: bytes,
        poll_s: float = POLL_S,
    ) -> None:
        self._dht = dht
        self._blocks = blocks
        self._reputation = reputation
        self._owner = owner
        self.poll_s = poll_s
        self.store = EvidenceStore()
        self._mine: list[Accusation] = []
        self._endorsed: list[Accusation] = []
        self._judged: collections.OrderedDict[str, int] = collections.OrderedDict()
        """Evidence -> failed fetches so far; FETCH_ATTEMPTS once judged (by anyone's)."""
        self._accusers: collections.OrderedDict[str, dict[str, float]] = collections.OrderedDict()
        """Accused -> {accuser: when} whose evidence held, where this daemon could not
        recompute (the latest MAX_JUDGED accused)."""
        self._tasks: set[asyncio.Task] = set()
        self._judging: asyncio.Task | None = None
        self._local = None
        self._recomputing = asyncio.Lock()
        """One recomputation at a time: they share this machine's cores with serving."""
        self.filed = 0
        self.verified = 0
        self.refuted = 0

    async def start(self) -> None:
        await self._dht.p2p.add_binary_stream_handler(EVIDENCE_HANDLE, self.store.serve)
        self._judging = asyncio.create_task(self._judge_forever(), name="judge-accusations")

    async def stop(self) -> None:
        tasks = [*self._tasks, *([self._judging] if self._judging else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):
            await self._dht.p2p.remove_binary_stream_handler(EVIDENCE_HANDLE)

    def accuse(self, peer_id: str, evidence: Evidence, reason: str) -> None:
        """Files an accusation of `peer_id` with its evidence (in the background)."""

        async def file() -> None:
            raw = await asyncio.to_thread(evidence.to_bytes)
            certificate = evidence.certificate.check()
            blocks = (certificate.start, certificate.end)
            await self._file(peer_id, raw, "serving", blocks, reason)

        self._own(file())

    def accuse_training(self, peer_id: str, evidence: TrainingEvidence, reason: str) -> None:
        """Files an accusation of a training peer with a validator's evidence (in the
        background)."""

        async def file() -> None:
            raw = await asyncio.to_thread(evidence.to_bytes)
            claim = await asyncio.to_thread(evidence.checked)
            # This daemon recomputed the work itself (it was the peer's validator).
            self._convict(peer_id, reason, upheld=False)
            await self._file(peer_id, raw, "training", evidence.job.stages[claim.stage], reason)

        self._own(file())

    def _own(self, work: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            try:
                await work
            except Exception as exc:  # the ban stands here; only its spreading failed
                logger.warning("could not file an accusation: %s", exc)

        task = asyncio.create_task(guarded(), name="file-accusation")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _file(
        self, peer_id: str, raw: bytes, kind: str, blocks: tuple[int, int], reason: str
    ) -> None:
        """Publishes an accusation with its `raw` evidence: this daemon's own, or an
        endorsement of one it recomputed."""
        try:
            if len(raw) > MAX_EVIDENCE_BYTES:
                logger.info("not accusing %s: its evidence is over what judges fetch", peer_id)
                return
            name = self.store.add(raw)
            accusation = Accusation(
                kind=kind,
                accused=peer_id,
                start=blocks[0],
                end=blocks[1],
                reason=reason,
                filed_s=time.time(),
                evidence=name,
            )
            if reason == ENDORSED:
                self._endorsed = [*self._endorsed, accusation][-MAX_PER_ACCUSER:]
            else:
                self._mine = [*self._mine, accusation][-MAX_OWN:]
            published = [*self._mine, *self._endorsed][-MAX_PER_ACCUSER:]
            model = await self._blocks.served_model()
            stored = await publish_on_node(
                self._dht.node, model.swarm_name, published, owner=self._owner,
                timeout_s=DHT_TIMEOUT_S,
            )  # fmt: skip
            self.filed += 1
            logger.warning("accused %s (%s); published: %s", peer_id, reason, stored)
        except Exception as exc:  # the ban stands here; only its spreading failed
            logger.warning("could not file the accusation of %s: %s", peer_id, exc)

    async def _judge_forever(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            try:
                await self.judge_new()
            except Exception as exc:  # a DHT hiccup or a model not there yet: next round
                logger.info("judging accusations failed this round: %s", exc)

    async def judge_new(self) -> None:
        """Judges the accusations published since the last round: one per accuser (its
        latest), `MAX_PER_ROUND` accusers, the best-standing first."""
        model = await self._blocks.served_model()
        found = await read_on_node(self._dht.node, model.swarm_name, timeout_s=DHT_TIMEOUT_S)
        own, reputation = self._dht.peer_id, self._reputation()
        latest: dict[str, Accusation] = {}
        for accuser, accusation in found or ():
            if accuser != own and self._judged.get(accusation.evidence, 0) < FETCH_ATTEMPTS:
                latest[accuser] = accusation  # each accuser's list is oldest first
        order = sorted(latest, key=lambda peer: -standing(reputation.of(peer).record))
        fetching = asyncio.Semaphore(MAX_FETCHES)

        async def judge(accuser: str) -> None:
            async with fetching:
                await self._judge(accuser, latest[accuser])

        judged = await asyncio.gather(
            *(judge(accuser) for accuser in order[:MAX_PER_ROUND]), return_exceptions=True
        )
        for failure in (each for each in judged if isinstance(each, Exception)):
            logger.warning("judging an accusation failed: %r", failure)

    async def _judge(self, accuser: str, accusation: Accusation) -> None:
        reputation = self._reputation()
        accused, name = accusation.accused, accusation.evidence
        if reputation.is_banned(accuser) or reputation.is_banned(accused):
            self._mark(name, FETCH_ATTEMPTS)
            return
        try:
            raw = await fetch_evidence(self._dht.p2p, accuser, name, timeout_s=FETCH_TIMEOUT_S)
        except EvidenceFetchError as exc:
            logger.info("%s", exc)
            self._mark(name, self._judged.get(name, 0) + 1)
            return
        self._mark(name, FETCH_ATTEMPTS)
        try:
            if accusation.kind == "training":
                wrong = await self._training_wrong(raw, accusation)
            else:
                evidence = await asyncio.to_thread(_checked, raw, accusation)
                fmt = await asyncio.to_thread(lambda: self._blocks.fmt)  # the swarm's, ours
                wrong = await is_wrong(evidence, self._replay, tolerance_for_format(fmt.label))
        except EvidenceError as exc:
            self._refute(accuser, accused, f"evidence that does not hold ({exc})")
            return
        except (EvidenceLimitError, UndecidableError) as exc:
            logger.info("not judging the accusation of %s by %s: %s", accused, accuser, exc)
            return
        except CannotRecomputeError:
            self._count_accuser(accuser, accusation)
            return
        if not wrong:
            self._refute(accuser, accused, "an output this peer recomputed right")
        elif self._convict(
            accused, f"{accusation.reason} ({accusation.kind}; proven by {accuser}, recomputed)"
        ):
            blocks = (accusation.start, accusation.end)
            await self._file(accused, raw, accusation.kind, blocks, ENDORSED)

    async def _training_wrong(self, raw: bytes, accusation: Accusation) -> bool:
        model = await self._blocks.served_model()
        async with self._recomputing:
            return await asyncio.to_thread(
                training_verdict, raw, accusation, model, max_age_s=EVIDENCE_MAX_AGE_S
            )

    def _convict(self, accused: str, reason: str, *, upheld: bool = True) -> bool:
        """Bans the accused, unless it is this peer (a drill's own blocks) or already
        banned (accusations judged side by side must not stack bans); whether it did.
        `upheld`: on another's accusation (counted), not on this daemon's own check."""
        reputation = self._reputation()
        if accused == self._dht.peer_id or reputation.is_banned(accused):
            return False
        reputation.record_check(accused, passed=False)
        reputation.ban(accused, reason)
        if upheld:
            self.verified += 1
        logger.warning("banned %s: %s", accused, reason)
        return True

    def _refute(self, accuser: str, accused: str, what: str) -> None:
        reputation = self._reputation()
        if reputation.is_banned(accuser):
            return  # one lie judged twice (side by side) costs one ban
        reputation.record_check(accuser, passed=False)
        reputation.ban(accuser, f"false accusation against {accused}: {what}")
        self.refuted += 1
        logger.warning("banned %s for a false accusation against %s: %s", accuser, accused, what)

    def _count_accuser(self, accuser: str, accusation: Accusation) -> None:
        """Counts a reputable accuser's word where this daemon cannot recompute; bans
        at `QUORUM` of them within `QUORUM_WINDOW_S` (the accuser at hand one of them)."""
        reputation, now = self._reputation(), time.time()

        def is_reputable(peer: str) -> bool:
            record = reputation.of(peer).record
            return not reputation.is_banned(peer) and standing(record) >= REPUTABLE_STANDING

        if not is_reputable(accuser):
            return
        accusers = self._accusers.setdefault(accusation.accused, {})
        accusers[accuser] = now
        self._accusers.move_to_end(accusation.accused)
        while len(self._accusers) > MAX_JUDGED:
            self._accusers.popitem(last=False)
        recent = [p for p, when in accusers.items() if now - when < QUORUM_WINDOW_S]
        if len([peer for peer in recent if is_reputable(peer)]) >= QUORUM:
            reason = f"{accusation.reason} (accused by {len(recent)} reputable peers)"
            if self._convict(accusation.accused, reason):
                del self._accusers[accusation.accused]  # a next ban needs new accusations

    def _mark(self, name: str, attempts: int) -> None:
        self._judged[name] = attempts
        self._judged.move_to_end(name)
        while len(self._judged) > MAX_JUDGED:
            self._judged.popitem(last=False)

    async def _replay(
        self, start: int, end: int, steps: list[tuple[int, torch.Tensor]]
    ) -> torch.Tensor:
        if self._local is None:
            model = await self._blocks.served_model()
            fmt = await asyncio.to_thread(lambda: self._blocks.fmt)
            self._local = local_blocks(model, fmt, self._blocks)
        async with self._recomputing:  # one span loaded at a time, too
            span = await asyncio.to_thread(self._local, start, end)
        if span is None:
            raise CannotRecomputeError(f"blocks {start}:{end} are too large to load here")
        config = span.config
        batch = steps[0][1].shape[0]
        length = max(position + hidden.shape[1] for position, hidden in steps)
        if (
            length > config.max_position_embeddings
            or batch * length > MAX_REPLAY_POSITIONS
            or any(h.shape[0] != batch or h.shape[2] != config.hidden_size for _, h in steps)
        ):
            raise EvidenceLimitError(f"steps over this peer's limits (batch {batch}, {length})")
        async with self._recomputing:
            return await replay_steps(span, steps)


def _checked(raw: bytes, accusation: Accusation) -> Evidence:
    """The evidence, once it holds and is of the accused's recent session of these
    blocks."""
    evidence = Evidence.from_bytes(raw)
    certificate = evidence.checked_certificate()
    named = (certificate.server, certificate.start, certificate.end)
    if named != (accusation.accused, accusation.start, accusation.end):
        raise EvidenceError("the evidence is of another server or span than the accusation")
    if time.time() - certificate.issued_s > EVIDENCE_MAX_AGE_S:
        raise EvidenceLimitError("the evidence is of a session too old to judge")
    return evidence
