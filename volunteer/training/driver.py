"""The driver of a training job: it feeds the data through the stages and closes each
global step, trusting no stage peer.

Per step it cuts the step's batch (rows `step * batch .. + batch` of the job's data,
wrapping) into microbatches and routes each through one peer per stage, the one
expected to finish first given what it has queued and its measured speed (SWARM's
stochastic wiring); it logs, per stage and peer, each microbatch's input and the
gradient it was given (the last stage: the targets). Then every stage settles its step
(the last stage first; `volunteer.training.settling`), and once all have, they apply it:

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

Before each step, failed peers that answer again are brought to the current state,
peers move from fast to slow stages taking the stage's state with them, and every peer
hears the roster (`volunteer.training.membership`).
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import torch
from hivemind.p2p import P2P

from volunteer.training.answers import answer_problem
from volunteer.training.calls import FENCED, MAX_ROUNDS, TrainingCallError, call
from volunteer.training.job import TrainingJob
from volunteer.training.judge import differs
from volunteer.training.membership import Membership
from volunteer.training.result import agreed_stage_weights
from volunteer.training.settling import Settling
from volunteer.training.step_types import (
    CALL_TIMEOUT_S,
    Applying,
    PeerWork,
    Settled,
    StepReport,
    TrainingStalled,
    Work,
    together,
)

SHARE_WAIT_S = 5.0
"""How long peers wait for each other's shares: a share later than this is dropped."""
SPEED_MEMORY = 0.3
"""Weight of the newest measurement in a peer's speed (an exponential average)."""
_PASS_SHARE = {"forward": 0.25, "backward": 0.75, "loss": 1.0}
"""The part of a stage's whole pass that each call runs (`Driver._timed`)."""

logger = logging.getLogger(__name__)


class Driver(Settling, Membership):
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
        on_settled: Callable[[int, float, list[Applying]], Awaitable[None]] | None = None,
        banned_outside: Callable[[str], bool] | None = None,
        epoch: int = 0,
    ) -> None:
        if data.dtype != torch.int64 or data.dim() != 2 or data.shape[1] != job.sequence_length + 1:
            raise ValueError(f"data must be int64 rows of {job.sequence_length + 1} token ids")
        self.p2p = p2p
        self.job = job
        self.epoch = epoch
        """Takeovers of the job so far: a backup that drives it on counts one more, and
        stage peers obey the latest driver only (`volunteer.training.peer`)."""
        self.outdriven = False
        """Set when a stage peer refused a call because a later driver drives the job."""
        self.data = data
        self.members = dict(members)
        self.checks = checks
        """Peers past probation recomputed per stage and round; 0: no validation at
        all, probation included."""
        self.share_wait_s = share_wait_s
        self.rebalance = rebalance
        self._on_work = on_work
        self._on_settled = on_settled
        self._banned_outside = banned_outside
        """Whether a peer is banned outside the job (the daemon's reputation: a proven
        liar in serving or another job): it does no work in this one either."""
        """Told, before any stage applies, of the step, its loss and what each stage is
        to apply: what `finish_apply` needs if the driver stops in between."""
        self.stale: set[str] = set()
        """Peers that took a step without its shares: back only with another's state."""
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
        self._restart = False
        """Set when the step must start over (`_run_stage`)."""
        self._dropped: set[str] = set()
        """Peers dropped from a round of this step, in any of its starts."""
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
        prior = self.speed_prior()
        return min(peers, key=lambda p: ((self._queued[p] + 1) / self.speeds.get(p, prior), p))

    def speed_prior(self) -> float:
        """The speed assumed of a peer not measured yet: the mean of those measured."""
        return sum(self.speeds.values()) / len(self.speeds) if self.speeds else 1.0

    def _age_speeds(self) -> None:
        """A peer given no work in the last step was not measured in it: a speed below
        the mean moves halfway to it, so the peer is tried again: else a peer measured
        slow once, under a passing load, would stay idle for good."""
        worked = {peer for log in self._log for peer, works in log.items() if works}
        prior = self.speed_prior()
        for peer, speed in self.speeds.items():
            if peer not in worked and speed < prior:
                self.speeds[peer] = (speed + prior) / 2

    async def _call(
        self, peer: str, header: dict[str, Any], tensors: list, *, timeout_s: float = CALL_TIMEOUT_S
    ):
        """A call to a stage peer; a failure takes the peer out of this step."""
        try:
            return await self._ask(
                peer, header, tensors, timeout_s=timeout_s, max_answer_bytes=self._max_answer
            )
        except TrainingCallError as exc:
            if peer not in self.failed:
                logger.warning("training peer failed in step %d: %s", self.step, exc)
            self.failed.add(peer)
            raise

    async def _ask(
        self,
        peer: str,
        header: dict[str, Any],
        tensors: list | tuple = (),
        *,
        timeout_s: float,
        max_answer_bytes: int,
    ):
        """Every call to a stage peer: it carries the driver's `epoch`; a refusal saying
        a later driver took over sets `outdriven`."""
        try:
            return await call(
                self.p2p, peer, {**header, "epoch": self.epoch}, tensors,
                timeout_s=timeout_s, max_answer_bytes=max_answer_bytes,
            )  # fmt: skip
        except TrainingCallError as exc:
            if FENCED in str(exc):
                self.outdriven = True
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
            problem = answer_problem(header["op"], stage == 0, tensors, answer, out)
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

    async def result(self) -> list[list[torch.Tensor]]:
        """Each stage's trained tensors as most of its live peers hold them
        (`volunteer.training.result`); ResultError if a stage has no such majority."""
        stages = []
        for stage in range(len(self.job.stages)):
            peers = self.stage_peers(stage)
            weights = agreed_stage_weights(
                self.p2p, peers, stage=stage, steps=self.step,
                max_answer_bytes=self._max_answer, timeout_s=CALL_TIMEOUT_S,
            )  # fmt: skip
            stages.append(await weights)
        return stages

    async def finish_apply(self, pending: list[Applying]) -> None:
        """Closes a step this driver settled but stopped applying (it restarted): the
        peers still at the step apply it now; one that lost the shares takes the state
        of one past the step. Then the driver is past it too."""
        for applying in pending:
            peers = [
                peer
                for peer, stage in self.members.items()
                if stage == applying.stage and peer not in self.banned
            ]
            header = applying.header(self.step)
            replies = await asyncio.gather(
                *(self._ask(p, header, timeout_s=CALL_TIMEOUT_S, max_answer_bytes=4096)
                  for p in peers),
                return_exceptions=True,
            )  # fmt: skip
            took = {
                peer: bool(reply[0].get("synced"))
                for peer, reply in zip(peers, replies, strict=True)
                if not isinstance(reply, BaseException)
            }
            # A peer that refused may have applied before the driver stopped.
            others = [peer for peer in peers if peer not in took]
            steps = await asyncio.gather(*map(self._probe, others))
            sources = [peer for peer, synced in took.items() if synced]
            sources += [peer for peer, at in zip(others, steps, strict=True) if at == self.step + 1]
            for peer in [peer for peer, synced in took.items() if not synced]:
                self.stale.add(peer)
                if sources and await self._sync(peer, applying.stage, sources[0], self.step + 1):
                    self.stale.discard(peer)
        self.step += 1

    # A step.

    async def run_step(self) -> StepReport:
        began = time.perf_counter()
        self._age_speeds()
        banned_before = set(self.banned)
        for peer in list(self.members):
            if peer not in self.banned and self._banned_outside and self._banned_outside(peer):
                self._ban(peer, "it is banned by this daemon's own checks")
        await self._prepare()
        self._dropped.clear()
        try:
            for _ in range(MAX_ROUNDS):
                settled = await self._attempt()
                if settled is not None:
                    break
                # A liar's activations or loss reached later stages, whose work cannot be
                # told apart from honest work: the step runs again without the liar.
                await self._forget_step()
                await self._send_roster()
            else:
                raise TrainingStalled(f"step {self.step} was started over {MAX_ROUNDS} times")
            applies = [self._applying(each) for each in settled]
            if self._on_settled is not None:  # before any stage applies: see Driver
                await self._on_settled(self.step, sum(self._losses) / self.job.batch_size, applies)
            for each, applying in zip(settled, applies, strict=True):
                await self._apply(applying, each.members)
        except TrainingStalled:
            await self._forget_step()  # the step starts over: nothing of it may count twice
            raise
        self._report_work()
        report = StepReport(
            step=self.step,
            loss=sum(self._losses) / self.job.batch_size,
            seconds=time.perf_counter() - began,
            dropped=sorted(self._dropped),
            banned=sorted(set(self.banned) - banned_before),
            rounds=max(each.round for each in settled) + 1,
            unchecked=sorted(self._unchecked),
        )
        self.history.append(report)
        self.step += 1
        return report

    async def _attempt(self) -> list[Settled] | None:
        """The step's microbatches through every stage, then each stage settled; None
        when it must start over (`_restart`)."""
        stages = len(self.job.stages)
        self._log = [collections.defaultdict(list) for _ in range(stages)]
        self._losses = []
        self._restart = False
        rows = (self.step * self.job.batch_size + torch.arange(self.job.batch_size)) % len(
            self.data
        )
        batch = self.data[rows]
        micro = self.job.microbatch_size
        self._corrected = [{} for _ in range(stages)]
        self._checked.clear()
        self._unchecked.clear()
        await together(
            self._microbatch(f"{self.step}.{index}", batch[first : first + micro])
            for index, first in enumerate(range(0, len(batch), micro))
        )
        # Last stage first: a liar found there gave earlier stages wrong gradients,
        # which their settling replaces before they gather. No stage applies until
        # every stage settled: a step that stalls leaves every stage as it was.
        settled = []
        for stage in reversed(range(stages)):
            settled.append(await self._settle(stage))
            self._dropped.update(settled[-1].dropped)
            if self._restart:
                return None
        return settled

    async def _microbatch(self, key: str, rows: torch.Tensor) -> None:
        """One microbatch forward through every stage, then backward, each stage's pass
        logged with what its peer answered; a peer that fails is replaced by another
        of its stage."""
        labels = rows[:, 1:].contiguous()
        last = len(self.job.stages) - 1
        inputs, peers = [rows[:, :-1].contiguous()], []
        for stage in range(last):
            peer, output = await self._forward(stage, key, inputs[-1])
            peers.append(peer)
            inputs.append(output)
        grad = await self._run_stage(last, Work(key, inputs[last], labels))
        for stage in reversed(range(last)):
            work = Work(key, inputs[stage], grad, output=inputs[stage + 1])
            header = {"op": "backward", "step": self.step, "key": key}
            try:
                _, out = await self._timed(peers[stage], stage, work.samples, header, [grad])
            except TrainingCallError:  # its saved input died with it: all again elsewhere
                grad = await self._run_stage(stage, work)
                continue
            grad_in = out[0] if out else None
            self._log[stage][peers[stage]].append(dataclasses.replace(work, grad_in=grad_in))
            grad = grad if grad_in is None else grad_in

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
        backward, or the loss on the last stage); the gradient w.r.t. its input. Run
        again for a peer that was dropped or failed, it also checks that peer's
        answers: activations or a loss other than it gave mean the later stages
        worked on a lie, and the step starts over."""
        last = stage == len(self.job.stages) - 1
        while True:
            peer = self._pick(stage, avoid)
            step = {"step": self.step, "key": work.key}
            try:
                if last:
                    answer, out = await self._timed(
                        peer, stage, work.samples, {"op": "loss", **step}, [work.given, work.second]
                    )
                    done = dataclasses.replace(work, loss=answer["loss"])
                else:
                    _, output = await self._timed(
                        peer, stage, work.samples, {"op": "forward", **step}, [work.given]
                    )
                    answer, out = await self._timed(
                        peer, stage, work.samples, {"op": "backward", **step}, [work.second]
                    )
                    done = dataclasses.replace(work, output=output[0])
            except TrainingCallError:
                continue
            done.grad_in = out[0] if out else None
            self._log[stage][peer].append(done)
            if last and not work.key.endswith("!"):
                self._losses.append(done.loss)
            if differs(work.output, done.output) or differs(work.loss, done.loss):
                logger.warning("stage %d passed on a wrong answer in step %d", stage, self.step)
                self._restart = True
            return work.second if done.grad_in is None else done.grad_in
