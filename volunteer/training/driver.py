"""The driver of a training job: it feeds the data through the stages and closes each
global step, trusting no stage peer.

Per step it cuts the step's batch (rows `step * batch .. + batch` of the job's data,
wrapping) into microbatches and routes each through one peer per stage, the one
expected to finish first given what it has queued and its measured speed (SWARM's
stochastic wiring); it logs, per stage and peer, each microbatch's input and the
gradient it was given (the last stage: the targets). Then every stage settles its step
(the last stage first), and once all have, they apply it:

1. **gather**: the stage's peers exchange shares; each answers with a digest of every
   share that reached it. A share the majority did not get alike (a silent, late or
   equivocating peer) is dropped.
2. **validate**: the shares of peers still on probation (their first few steps) and of
   `checks` peers drawn from the public seed are recomputed by another drawn peer from
   the log; a mismatch is decided by a third: the recomputed peer is banned, or, if the
   third sides with it, its accuser is.
3. **redo**: the microbatches of a dropped or banned peer are run again on the others,
   and the stage gathers again (a new round): no step loses data to a peer's failure.
4. **apply**: every member aggregates the kept shares with the sample counts the driver
   logged and steps; a member that could not (it missed a share) loads the stage's
   state from one that did.

Before each step, failed peers that answer again are brought to the current state, and
peers move from fast to slow stages (`scheduler.training.rebalance_stages`) taking the
stage's state with them.
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
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, TypeVar

import torch
from hivemind.p2p import P2P

from volunteer.scheduler.training import StagePeer, rebalance_stages
from volunteer.training.calls import MAX_ROUNDS, TrainingCallError, call
from volunteer.training.job import TrainingJob

CALL_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 3.0
SHARE_WAIT_S = 5.0
"""How long peers wait for each other's shares: a share later than this is dropped."""
TOLERANCE = 1e-3
"""Relative distance between a share and its recomputation that counts as a mismatch
(honest recomputation on the same kind of machine differs by float rounding only)."""
PROBATION_CHECKS = 3
"""A new peer's shares are all recomputed until this many were found right (BOINC's
adaptive replication): an attacker from the start is banned at its first step, and one
that waits must pass this many checks first."""
SPEED_MEMORY = 0.3
"""Weight of the newest measurement in a peer's speed (an exponential average)."""

logger = logging.getLogger(__name__)
T = TypeVar("T")


class TrainingStalled(RuntimeError):
    """A step cannot close: a stage has no peer left that can take its work."""


@dataclasses.dataclass
class Work:
    """One microbatch's pass through one stage, as the driver logged it."""

    key: str
    given: torch.Tensor
    """Its input to the stage: token ids (first stage) or hidden states."""
    second: torch.Tensor
    """The gradient w.r.t. the stage's output, or the targets (last stage)."""

    @property
    def samples(self) -> int:
        return self.given.shape[0]


@dataclasses.dataclass(frozen=True)
class PeerWork:
    """What a stage peer did in a step that the stage kept: receipted by the driver."""

    peer: str
    start: int
    end: int
    tokens: int
    """Positions it ran through its blocks, forward and backward."""
    checked: int
    """Its shares the validators recomputed (and found right) in the step."""


@dataclasses.dataclass(frozen=True)
class _Settled:
    """A stage's step once its shares are agreed, before it applies them."""

    stage: int
    round: int
    members: list[str]
    """The stage's peers that answered the round's gather (they apply)."""
    kept: list[str]
    dropped: list[str]


@dataclasses.dataclass
class StepReport:
    step: int
    loss: float
    seconds: float
    dropped: list[str]
    banned: list[str]
    rounds: int
    unchecked: list[str] = dataclasses.field(default_factory=list)
    """Peers whose shares went into the aggregate without a recomputation."""


class Driver:
    """Drives `job` over the stage peers in `members` (peer id -> stage)."""

    def __init__(
        self,
        *,
        p2p: P2P,
        job: TrainingJob,
        data: torch.Tensor,
        members: dict[str, int],
        checks: int = 1,
        share_wait_s: float = SHARE_WAIT_S,
        rebalance: bool = True,
        on_work: Callable[[PeerWork], None] | None = None,
    ) -> None:
        if data.dtype != torch.int64 or data.dim() != 2 or data.shape[1] != job.sequence_length + 1:
            raise ValueError(f"data must be int64 rows of {job.sequence_length + 1} token ids")
        self.p2p = p2p
        self.job = job
        self.data = data
        self.members = dict(members)
        self.checks = checks
        """Peers past probation recomputed per stage and round; 0: no validation at
        all, probation included."""
        self.share_wait_s = share_wait_s
        self.rebalance = rebalance
        self._on_work = on_work
        self._checked: collections.Counter[str] = collections.Counter()
        """Each peer's shares found right in this step (its receipt says so)."""
        self._verified: set[str] = set()
        """Shares found right in the current round."""
        self._unchecked: set[str] = set()
        """Peers whose shares this step aggregated unrecomputed."""
        self._passed: collections.Counter[str] = collections.Counter()
        """Each peer's shares found right since it joined: past `PROBATION_CHECKS`, it is
        checked by draw only."""
        self.step = 0
        self.banned: dict[str, int] = {}
        """Banned peers, with the step they were banned at."""
        self.failed: set[str] = set()
        """Peers that failed a call in this step (out of it; back when they answer)."""
        self.speeds: dict[str, float] = {}
        """Sequences per second each peer ran (measured here)."""
        self.history: list[StepReport] = []
        self._queued: collections.Counter[str] = collections.Counter()
        self._log: list[dict[str, list[Work]]] = []
        self._corrected: list[dict[str, torch.Tensor]] = []
        """Per stage, microbatch keys whose gradient came from a banned peer: the right one."""
        self._losses: list[float] = []
        largest = max(end - start for start, end in job.stages)
        self._max_answer = 64 * largest * 1 << 20

    # Who may work.

    def logged(self, peer: str) -> int:
        """Microbatch passes of this step logged as `peer`'s (its share's sequences)."""
        return sum(work.samples for log in self._log for work in log.get(peer, ()))

    def remove_member(self, peer: str) -> None:
        """A peer that left (its announcement expired)."""
        self.members.pop(peer, None)
        self.failed.discard(peer)

    def add_member(self, peer: str, stage: int) -> None:
        """A peer that joined (it announced itself): checked, and brought to the current
        step, before it works."""
        self.members[peer] = stage
        if self.step:
            self.failed.add(peer)

    def stage_peers(self, stage: int) -> list[str]:
        return sorted(
            peer
            for peer, at in self.members.items()
            if at == stage and peer not in self.banned and peer not in self.failed
        )

    def _pick(self, stage: int, avoid: set[str] = frozenset()) -> str:
        peers = [peer for peer in self.stage_peers(stage) if peer not in avoid]
        if not peers:
            raise TrainingStalled(f"stage {stage} has no peer left in step {self.step}")
        prior = sum(self.speeds.values()) / len(self.speeds) if self.speeds else 1.0
        return min(peers, key=lambda p: ((self._queued[p] + 1) / self.speeds.get(p, prior), p))

    async def _call(
        self, peer: str, header: dict[str, Any], tensors: list, *, timeout_s: float = CALL_TIMEOUT_S
    ):
        """A call to a stage peer; a failure takes the peer out of this step."""
        try:
            return await call(
                self.p2p,
                peer,
                header,
                tensors,
                timeout_s=timeout_s,
                max_answer_bytes=self._max_answer,
            )
        except TrainingCallError as exc:
            if peer not in self.failed:
                logger.warning("training peer failed in step %d: %s", self.step, exc)
            self.failed.add(peer)
            raise

    async def _timed(
        self, peer: str, stage: int, samples: float, header: dict[str, Any], tensors: list
    ):
        """A microbatch call, its answer checked for form (a peer that answers junk has
        failed); its time measures the peer's speed: sequences of a stage's whole pass
        per second (a forward is a quarter of the pass: backward recomputes it, and
        backward itself costs about twice a forward)."""
        samples *= _PASS_SHARE[header["op"]]
        self._queued[peer] += 1
        began = time.perf_counter()
        try:
            answer, out = await self._call(peer, header, tensors)
            problem = _answer_problem(header["op"], stage == 0, tensors, answer, out)
            if problem:
                self.failed.add(peer)
                logger.warning("training peer %s answered %s", peer, problem)
                raise TrainingCallError(f"{peer} answered {problem}")
            return answer, out
        finally:
            self._queued[peer] -= 1
            spent = max(time.perf_counter() - began, 1e-6)
            if peer not in self.failed:
                old = self.speeds.get(peer)
                new = samples / spent
                self.speeds[peer] = (
                    new if old is None else (1 - SPEED_MEMORY) * old + SPEED_MEMORY * new
                )

    # A step.

    async def run_step(self) -> StepReport:
        began = time.perf_counter()
        await self._prepare()
        stages = len(self.job.stages)
        self._log = [collections.defaultdict(list) for _ in range(stages)]
        self._losses = []
        rows = (self.step * self.job.batch_size + torch.arange(self.job.batch_size)) % len(
            self.data
        )
        batch = self.data[rows]
        micro = self.job.microbatch_size
        banned_before = set(self.banned)
        self._corrected = [{} for _ in range(stages)]
        self._checked.clear()
        self._unchecked.clear()
        try:
            await _together(
                self._microbatch(f"{self.step}.{index}", batch[first : first + micro])
                for index, first in enumerate(range(0, len(batch), micro))
            )
            # Last stage first: a liar found there gave earlier stages wrong gradients,
            # which their settling replaces before they gather. No stage applies until
            # every stage settled: a step that stalls leaves every stage as it was.
            settled = [await self._settle(stage) for stage in reversed(range(stages))]
            for each in settled:
                await self._apply(each.stage, each.round, each.members, each.kept)
        except TrainingStalled:
            await self._forget_step()  # the step starts over: nothing of it may count twice
            raise
        self._report_work()
        report = StepReport(
            step=self.step,
            loss=sum(self._losses) / self.job.batch_size,
            seconds=time.perf_counter() - began,
            dropped=sorted({peer for each in settled for peer in each.dropped}),
            banned=sorted(set(self.banned) - banned_before),
            rounds=max(each.round for each in settled) + 1,
            unchecked=sorted(self._unchecked),
        )
        self.history.append(report)
        self.step += 1
        return report

    async def _microbatch(self, key: str, rows: torch.Tensor) -> None:
        """One microbatch forward through every stage, then backward, each stage's pass
        logged; a peer that fails is replaced by another of its stage."""
        labels = rows[:, 1:].contiguous()
        last = len(self.job.stages) - 1
        inputs, peers = [rows[:, :-1].contiguous()], []
        for stage in range(last):
            peer, output = await self._forward(stage, key, inputs[-1])
            peers.append(peer)
            inputs.append(output)
        grad = await self._run_stage(last, Work(key, inputs[last], labels))
        for stage in reversed(range(last)):
            work = Work(key, inputs[stage], grad)
            header = {"op": "backward", "step": self.step, "key": key}
            try:
                _, out = await self._timed(peers[stage], stage, work.samples, header, [grad])
            except TrainingCallError:  # its saved input died with it: all again elsewhere
                grad = await self._run_stage(stage, work)
                continue
            self._log[stage][peers[stage]].append(work)
            grad = out[0] if out else grad

    async def _forward(self, stage: int, key: str, given: torch.Tensor) -> tuple[str, torch.Tensor]:
        while True:
            peer = self._pick(stage)
            try:
                _, out = await self._timed(
                    peer,
                    stage,
                    given.shape[0],
                    {"op": "forward", "step": self.step, "key": key},
                    [given],
                )
                return peer, out[0]
            except TrainingCallError:
                continue

    async def _run_stage(
        self, stage: int, work: Work, avoid: set[str] = frozenset()
    ) -> torch.Tensor:
        """A stage's whole pass of a logged microbatch on one of its peers (forward and
        backward, or the loss on the last stage); the gradient w.r.t. its input."""
        last = stage == len(self.job.stages) - 1
        while True:
            peer = self._pick(stage, avoid)
            step = {"step": self.step, "key": work.key}
            try:
                if last:
                    answer, out = await self._timed(
                        peer, stage, work.samples, {"op": "loss", **step}, [work.given, work.second]
                    )
                    loss = answer["loss"]
                else:
                    await self._timed(
                        peer, stage, work.samples, {"op": "forward", **step}, [work.given]
                    )
                    answer, out = await self._timed(
                        peer, stage, work.samples, {"op": "backward", **step}, [work.second]
                    )
            except TrainingCallError:
                continue
            self._log[stage][peer].append(work)
            if last and not work.key.endswith("!"):
                self._losses.append(loss)
            return out[0] if out else work.second

    # Closing a stage's step.

    async def _settle(self, stage: int) -> _Settled:
        """Gathers, checks and redoes until a round keeps every share it heard (module
        doc, steps 1 to 3)."""
        dropped_all = await self._untaint(stage)
        for round_ in range(MAX_ROUNDS):
            members = self.stage_peers(stage)
            log = self._log[stage]
            senders = [peer for peer in members if log.get(peer)]
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
            return _Settled(stage, round_, heard_members, kept, dropped_all)
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
        """Runs a dropped peer's microbatches of this stage again on the others; a
        banned peer's gradients for the stage before are replaced."""
        works = self._log[stage].pop(peer, [])
        results = await _together(
            self._run_stage(stage, self._renewed(stage, work), avoid | {peer}) for work in works
        )
        if stage and peer in self.banned:
            for work, grad in zip(works, results, strict=True):
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
            results = await _together(
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
        word against another); a second that disagrees bans the first."""
        first = await self._mismatch(judges[0], stage, round_, target)
        if first is False:
            self._checked[target] += 1
            self._passed[target] += 1
            self._verified.add(target)
        if not first:
            return False
        if len(judges) < 2:
            return True
        second = await self._mismatch(judges[1], stage, round_, target)
        if second:
            self._ban(target, f"its share differs from two recomputations in step {self.step}")
            return True
        if second is False:
            self._ban(judges[0], f"it called {target}'s share wrong in step {self.step}")
        return False

    async def _mismatch(self, judge: str, stage: int, round_: int, target: str) -> bool | None:
        tensors = [t for work in self._log[stage][target] for t in (work.given, work.second)]
        header = {"op": "verify", "step": self.step, "round": round_, "target": target}
        try:  # a judge that fails here is not taken out: gather and apply see to that
            answer, _ = await call(
                self.p2p, judge, header, tensors, timeout_s=CALL_TIMEOUT_S,
                max_answer_bytes=self._max_answer,
            )  # fmt: skip
        except TrainingCallError as exc:
            logger.info("judge %s did not recompute %s: %s", judge, target, exc)
            return None
        distance = answer.get("distance")
        if not isinstance(distance, float):
            self.failed.add(judge)
            return None
        return distance > TOLERANCE

    def _ban(self, peer: str, reason: str) -> None:
        logger.warning("banned training peer %s: %s", peer, reason)
        self.banned[peer] = self.step

    async def _apply(self, stage: int, round_: int, members: list[str], kept: list[str]) -> None:
        samples = {peer: sum(work.samples for work in self._log[stage][peer]) for peer in kept}
        header = {"op": "apply", "step": self.step, "round": round_, "included": samples}
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

    async def _probe(self, peer: str) -> int | None:
        """The steps a failed peer has taken, or None while it does not answer (quietly:
        a dead peer is asked before every step until it leaves the DHT)."""
        try:
            answer, _ = await call(
                self.p2p, peer, {"op": "info"}, timeout_s=PROBE_TIMEOUT_S, max_answer_bytes=4096
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
        """Has every peer drop what it summed in this step."""
        header = {"op": "reset", "step": self.step}
        await asyncio.gather(
            *(call(self.p2p, peer, header, timeout_s=PROBE_TIMEOUT_S, max_answer_bytes=4096)
              for peer in self.members if peer not in self.banned),
            return_exceptions=True,
        )  # fmt: skip

    async def _send_roster(self) -> None:
        """Tells every peer who the job's peers are (whom to take shares and state
        requests from); a peer that does not hear it is out of the step."""
        members = {p: s for p, s in self.members.items() if p not in self.banned}
        header = {"op": "roster", "members": members}
        replies = await asyncio.gather(
            *(call(self.p2p, peer, header, timeout_s=PROBE_TIMEOUT_S, max_answer_bytes=4096)
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
        failed = sorted(self.failed)
        answers = await asyncio.gather(*(self._probe(peer) for peer in failed))
        for peer, steps in zip(failed, answers, strict=True):
            if steps is None:
                continue  # still gone: asked again before the next step
            stage = self.members[peer]
            source = next(iter(self.stage_peers(stage)), None)
            self.failed.discard(peer)
            if steps != self.step and (
                source is None or not await self._sync(peer, stage, source, self.step)
            ):
                self.failed.add(peer)
        if not self.rebalance:
            return
        load = [float(self.job.batch_size)] * len(self.job.stages)
        prior = sum(self.speeds.values()) / len(self.speeds) if self.speeds else 1.0
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


_PASS_SHARE = {"forward": 0.25, "backward": 0.75, "loss": 1.0}


async def _together(work: Iterable[Awaitable[T]]) -> list[T]:
    """The results of running `work` at once; the first failure cancels the rest, so
    nothing of a failed step runs on."""
    tasks = [asyncio.ensure_future(each) for each in work]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def _answer_problem(
    op: str, first: bool, sent: list[torch.Tensor], answer: dict[str, Any], out: list
) -> str | None:
    """What is wrong with a microbatch answer's form, or None: a forward gives hidden
    states [B, S, H] for the microbatch (the input's shape past the first stage); a
    backward, and a loss past the first stage, the gradient w.r.t. the input; a loss, a
    finite number."""
    given = sent[0]
    if op == "forward":
        ok = (
            len(out) == 1
            and out[0].is_floating_point()
            and out[0].dim() == 3
            and out[0].shape[:2] == given.shape[:2]
            and (first or out[0].shape == given.shape)
        )
        return None if ok else "a forward output of the wrong form"
    if op == "loss":
        loss = answer.get("loss")
        if not isinstance(loss, float) or not math.isfinite(loss):
            return "a loss that is not a finite number"
    # backward: `given` is the gradient w.r.t. the output, shaped as the input past stage 0
    ok = not out if first else len(out) == 1 and out[0].shape == given.shape
    return None if ok else f"a {op} gradient of the wrong form"


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
