"""How the driver settles a stage's step (`volunteer.training.driver`, steps 1 to 3 of
its module doc): gather the shares, keep those a majority got alike, have validators
recompute drawn ones, ban liars, and run the work of dropped peers, and of peers that
took a liar's gradients, again on the others; then apply (step 4).

A mixin of `Driver`, which owns the state these methods use.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import hashlib
import logging
import math
import random
from typing import Any

import torch
from hivemind.p2p import P2P

from volunteer.training.calls import MAX_ROUNDS, TrainingCallError
from volunteer.training.job import TrainingJob
from volunteer.training.judge import TOLERANCE, VERDICTS, differs
from volunteer.training.step_types import (
    CALL_TIMEOUT_S,
    Applying,
    PeerWork,
    Settled,
    TrainingStalled,
    Work,
    together,
)

PROBATION_CHECKS = 3
"""A new peer's shares are all recomputed until this many were found right (BOINC's
adaptive replication): an attacker from the start is banned at its first step, and one
that waits must pass this many checks first."""

logger = logging.getLogger(__name__)


class Settling:
    """The settling half of `Driver` (see the module)."""

    p2p: P2P
    job: TrainingJob
    step: int
    checks: int
    share_wait_s: float
    banned: dict[str, int]
    failed: set[str]
    _log: list[dict[str, list[Work]]]
    _corrected: list[dict[str, torch.Tensor]]
    _restart: bool
    _checked: collections.Counter[str]
    _passed: collections.Counter[str]
    _verified: set[str]
    _unchecked: set[str]
    _max_answer: int
    # Also the driver's: stage_peers, _ask, _call, _run_stage, _on_work.

    async def _settle(self, stage: int) -> Settled:
        """Gathers, checks and redoes until a round keeps every share it heard (module
        doc, steps 1 to 3)."""
        dropped_all = await self._untaint(stage)
        for round_ in range(MAX_ROUNDS):
            members = self.stage_peers(stage)
            log = self._log[stage]
            for peer in list(log):  # a failed peer's sums died with it or are stale
                if peer not in members:
                    dropped_all.append(peer)
                    await self._redo(stage, peer)
            if any(peer not in self.stage_peers(stage) for peer in log if log.get(peer)):
                continue
            members = self.stage_peers(stage)
            senders = [peer for peer in members if log.get(peer)]
            header = {
                "op": "gather",
                "step": self.step,
                "round": round_,
                "senders": senders,
                "members": members,
                "wait_s": self.share_wait_s,
            }
            replies = await asyncio.gather(
                *(
                    self._call(peer, header, [], timeout_s=self.share_wait_s + CALL_TIMEOUT_S)
                    for peer in members
                ),
                return_exceptions=True,
            )
            heard = {
                peer: reply[0]["shares"]
                for peer, reply in zip(members, replies, strict=True)
                if not isinstance(reply, BaseException) and isinstance(reply[0].get("shares"), dict)
            }
            kept = [peer for peer in senders if _agreed(peer, heard)]
            dropped = [peer for peer in senders if peer not in kept]
            self._verified.clear()
            if self.checks and kept:
                dropped += await self._validate(stage, round_, kept, heard)
            if dropped:
                dropped_all += dropped
                for peer in dropped:
                    await self._redo(stage, peer, avoid=set(dropped))
                continue
            self._unchecked.update(peer for peer in kept if peer not in self._verified)
            heard_members = [peer for peer in members if peer in heard]
            return Settled(stage, round_, heard_members, kept, dropped_all)
        raise TrainingStalled(
            f"stage {stage} could not close step {self.step} in {MAX_ROUNDS} rounds"
        )

    def _report_work(self) -> None:
        if self._on_work is None:
            return
        for stage, log in enumerate(self._log):
            start, end = self.job.stages[stage]
            for peer, works in log.items():
                tokens = sum(work.given.shape[0] * work.given.shape[1] for work in works)
                if works and peer not in self.banned:
                    self._on_work(PeerWork(peer, start, end, tokens, self._checked[peer]))

    async def _redo(self, stage: int, peer: str, avoid: set[str] = frozenset()) -> None:
        """Runs a dropped peer's microbatches of this stage again on the others; the
        gradients it sent the stage before are replaced where it was banned or they
        differ from the new ones."""
        works = self._log[stage].pop(peer, [])
        restart, self._restart = self._restart, False
        results = await together(
            self._run_stage(stage, self._renewed(stage, work), avoid | {peer}) for work in works
        )
        if self._restart and peer not in self.banned:
            self.failed.add(peer)  # it passed on a wrong answer: not in the step's new start
        self._restart |= restart
        for work, grad in zip(works, results, strict=True):
            if stage and (peer in self.banned or differs(work.grad_in, grad)):
                self._corrected[stage - 1][work.key.rstrip("!")] = grad

    def _renewed(self, stage: int, work: Work) -> Work:
        """A logged microbatch to run again: a new key, the corrected gradient if any."""
        fixed = self._corrected[stage].get(work.key.rstrip("!"))
        return dataclasses.replace(
            work, key=work.key + "!", second=work.second if fixed is None else fixed
        )

    async def _untaint(self, stage: int) -> list[str]:
        """Runs again, with the right gradients, every microbatch of the peers that got
        a wrong one from a banned peer, after they forget their sums; the corrected
        gradients go on to the stage before."""
        fixed = self._corrected[stage]
        log = self._log[stage]
        tainted = [p for p, works in log.items() if any(w.key.rstrip("!") in fixed for w in works)]
        for peer in tainted:
            works = log.pop(peer)
            with contextlib.suppress(TrainingCallError):  # failed: out of the step anyway
                await self._call(peer, {"op": "reset", "step": self.step}, [])
            results = await together(
                self._run_stage(stage, self._renewed(stage, work)) for work in works
            )
            for work, grad in zip(works, results, strict=True):
                if stage and work.key.rstrip("!") in fixed:
                    self._corrected[stage - 1][work.key.rstrip("!")] = grad
        return tainted

    async def _validate(
        self, stage: int, round_: int, kept: list[str], heard: dict[str, dict[str, Any]]
    ) -> list[str]:
        """Recomputes the shares of peers on probation and of `checks` peers drawn among
        the others (module doc); the peers to drop."""
        draw = random.Random(_seed(self.job.seed, self.step, stage, round_))
        probation = [peer for peer in kept if self._passed[peer] < PROBATION_CHECKS]
        others = [peer for peer in kept if peer not in probation]
        targets = probation + draw.sample(others, min(self.checks, len(others)))
        dropped = []
        for target in targets:
            # Judges hold the share the majority got: one the target kept from a peer
            # cannot make that peer look like a failing judge.
            sent = heard[target].get(target)
            judges = [
                peer
                for peer, shares in heard.items()
                if peer != target and peer not in self.banned and shares.get(target) == sent
            ]
            draw.shuffle(judges)
            if judges and await self._judged_wrong(stage, round_, target, judges):
                dropped.append(target)
        return dropped

    async def _judged_wrong(self, stage: int, round_: int, target: str, judges: list[str]) -> bool:
        """Whether `target`'s share is to be dropped: a first judge's mismatch stands if
        a second agrees (`target` is banned) or if there is no second (no ban: one
        word against another); a second that disagrees bans the first. A judge that
        cannot recompute gives no verdict and the next one is asked: a share is never
        waved through because one judge could not answer."""
        verdicts: list[tuple[str, bool]] = []
        for judge in judges:
            wrong = await self._mismatch(judge, stage, round_, target)
            if wrong is None:
                continue
            verdicts.append((judge, wrong))
            if not verdicts[0][1] or len(verdicts) == 2:
                break
        if not verdicts:
            return False  # no judge could: kept, and reported unchecked
        first_judge, wrong = verdicts[0]
        if not wrong:
            self._checked[target] += 1
            self._passed[target] += 1
            self._verified.add(target)
            return False
        if len(verdicts) < 2:
            return True
        if verdicts[1][1]:
            self._ban(target, f"its work differs from two recomputations in step {self.step}")
            return True
        self._ban(first_judge, f"it called {target}'s work wrong in step {self.step}")
        return False

    async def _mismatch(self, judge: str, stage: int, round_: int, target: str) -> bool | None:
        """Whether `judge` finds `target`'s share or answers wrong
        (`volunteer.training.judge`); None: it could not say."""
        works = self._log[stage][target]
        tensors = [
            tensor
            for work in works
            for tensor in (work.given, work.second, work.output, work.grad_in)
            if tensor is not None
        ]
        header = {"op": "verify", "step": self.step, "round": round_, "target": target}
        if stage == len(self.job.stages) - 1:
            header["losses"] = [work.loss for work in works]
        try:  # a judge that fails here is not taken out: gather and apply see to that
            answer, _ = await self._ask(
                judge, header, tensors, timeout_s=CALL_TIMEOUT_S, max_answer_bytes=self._max_answer
            )
        except TrainingCallError as exc:
            logger.info("judge %s did not recompute %s: %s", judge, target, exc)
            return None
        distances = [answer.get(name) for name in VERDICTS]
        if not all(isinstance(distance, float) for distance in distances):
            self.failed.add(judge)
            return None
        if any(math.isnan(distance) for distance in distances):
            return None  # its recomputation overflowed: it says nothing either way
        if max(distances) > TOLERANCE:
            found = dict(zip(VERDICTS, distances, strict=True))
            logger.info("judge %s found %s wrong: %s", judge, target, found)
            return True
        return False

    def _ban(self, peer: str, reason: str) -> None:
        logger.warning("banned training peer %s: %s", peer, reason)
        self.banned[peer] = self.step

    def _applying(self, settled: Settled) -> Applying:
        log = self._log[settled.stage]
        samples = {peer: sum(work.samples for work in log[peer]) for peer in settled.kept}
        return Applying(settled.stage, settled.round, samples)

    async def _apply(self, applying: Applying, members: list[str]) -> None:
        stage = applying.stage
        header = applying.header(self.step)
        replies = await asyncio.gather(
            *(self._call(peer, header, []) for peer in members), return_exceptions=True
        )
        digests = collections.Counter(
            reply[0].get("digest")
            for reply in replies
            if not isinstance(reply, BaseException) and reply[0].get("synced")
        )
        if not digests:
            raise TrainingStalled(f"no peer of stage {stage} could take step {self.step}")
        agreed = digests.most_common(1)[0][0]
        good = [
            peer
            for peer, reply in zip(members, replies, strict=True)
            if not isinstance(reply, BaseException) and reply[0].get("digest") == agreed
        ]
        for peer, reply in zip(members, replies, strict=True):
            if peer not in good and not isinstance(reply, BaseException):
                await self._sync(peer, stage, good[0], self.step + 1)


def _agreed(peer: str, heard: dict[str, dict[str, Any]]) -> bool:
    """Whether a majority of the peers that answered got the same share of `peer`, the
    one `peer` says it sent."""
    own = heard.get(peer, {}).get(peer)
    if own is None:
        return False
    same = sum(1 for shares in heard.values() if shares.get(peer) == own)
    return same * 2 > len(heard)


def _seed(*parts: int) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")
