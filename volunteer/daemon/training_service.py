"""The daemon's training role: driving a job it created, or being a stage peer of one.

- `train_create`: reads the data, announces a `TrainingJob` for the daemon's model in
  its own DHT subkey (so it is the job's driver, and peers obey it alone) and drives it
  (`volunteer.training.driver`): before each step it reads who joined from the DHT;
  after each, it sends each peer a signed receipt for the work the stage kept; when
  done, it saves the result (`volunteer.daemon.training_result`).
- `train_join`: reads the job from the DHT (not a finished one), joins the stage with
  the fewest peers (or the one asked), loads that stage's blocks in float32 and serves
  them as a `TrainingPeer`, announcing its stage and step; the driver may move it.
- `train_standby`: a backup driver named in a job holds its data and drives it on if
  its driver is gone for good (`volunteer.daemon.training_standby`).
- `train_leave`: stops any of them; `train_status` and the `status` reply tell of it.
- With `--train`, every announce period while it has no role, the daemon asks the
  scheduler (`volunteer.scheduler.role`) whether training helps the swarm more than its
  serving; if so it pauses its serving (handing its blocks over first) and joins a job,
  and resumes serving when the job is done.

One role at a time. The drill attacks of `VOLUNTEER_FAULTS` make a stage peer Byzantine
on purpose (its log and status say so).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import torch

from volunteer.control.messages import (
    TRAIN_CREATE,
    TRAIN_JOIN,
    TRAIN_LEAVE,
    TRAIN_STANDBY,
    TRAIN_STATUS,
    NoParams,
    TrainingStatus,
    TrainJoinParams,
)
from volunteer.control.server import ControlServer
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.credit_service import CreditService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.training_driving import (
    ANNOUNCE_PERIOD_S,
    DHT_TIMEOUT_S,
    DriveRecord,
    Driving,
    forget_record,
    read_record,
)
from volunteer.daemon.training_standby import Standby
from volunteer.errors import SettingsError, VolunteerError
from volunteer.model_cache.served_model import ServedModel, open_model
from volunteer.paths import Paths
from volunteer.scheduler.role import (
    WANTED_BLOCK_TPS,
    RoleDecision,
    RoleInputs,
    RoleKind,
    choose_role,
)
from volunteer.settings import Settings
from volunteer.swarm.records import RecordError
from volunteer.training.attack_drill import AttackDrill
from volunteer.training.driver import Driver
from volunteer.training.job import TrainingJob
from volunteer.training.peer import Accuse, TrainingPeer
from volunteer.training.records import (
    StageMember,
    announce_member_on_node,
    is_done,
    read_jobs_on_node,
    read_members_on_node,
)
from volunteer.transport.commitment import PeerSigner

MAX_LOSSES = 512
T = TypeVar("T")

logger = logging.getLogger(__name__)


class TrainingService(Driving, Standby):
    """See the module."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        dht: DHTService,
        blocks: BlockService,
        credit: CreditService,
        *,
        owner: bytes,
        signer: PeerSigner,
        accuse: Accuse | None = None,
        is_banned: Callable[[str], bool] = lambda _peer: False,
    ) -> None:
        """`signer` signs this peer's shares (its peer key); `accuse` files a validator's
        evidence against a peer for the whole swarm to judge; `is_banned` says whom this
        daemon bans (its reputation): they do no work in a job it drives."""
        self._settings = settings
        self._signer = signer
        self._accuse = accuse
        self._is_banned = is_banned
        self._paths = paths
        self._dht = dht
        self._blocks = blocks
        self._credit = credit
        self._owner = owner
        self._tasks: set[asyncio.Task[None]] = set()
        self._status = TrainingStatus()
        self._losses: collections.deque[tuple[int, float]] = collections.deque(maxlen=MAX_LOSSES)
        self._driver: Driver | None = None
        self._peer: TrainingPeer | None = None
        self._job: TrainingJob | None = None
        self._standing: DriveRecord | None = None
        self._is_standing = False
        self._heard = False
        self._handlers = 0
        self._serving_data = False
        self._role_lock = asyncio.Lock()
        self._mirror_skips: dict[str, tuple[int, int]] = {}
        self._watch: asyncio.Task[None] | None = None
        self._paused = False
        """Whether this service paused serving for the training role."""
        self._auto = False
        """Whether the role watch took the current role (it then leaves it when done)."""

    def register_control(self, control: ControlServer) -> None:
        control.register(TRAIN_CREATE, self._one_at_a_time(self.create))
        control.register(TRAIN_JOIN, self._one_at_a_time(self.join))
        control.register(TRAIN_STANDBY, self._one_at_a_time(self.standby))
        control.register(TRAIN_LEAVE, self._one_at_a_time(self.leave))
        control.register(TRAIN_STATUS, self.train_status)

    async def start(self) -> None:
        """Drives on a job this daemon drove before it stopped (`training_driving`);
        with `--train`, watches for the role (module doc); else roles start on request."""
        self._own(self._one_at_a_time(self.resume)(None), "training job resume")
        if self._settings.train:
            watch = asyncio.ensure_future(self._watch_role())
            watch.set_name("training role watch")
            self._watch = watch

    async def stop(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            await asyncio.gather(self._watch, return_exceptions=True)
        await self._end_role()  # a job it drives goes on when the daemon is back

    async def _watch_role(self) -> None:
        while True:
            await asyncio.sleep(self._settings.announce_period_s)
            if self._has_role():
                state = self.train_status_now().training_state
                if self._auto and state in ("done", "failed"):
                    await self._end_role()  # and serve again
                continue
            try:
                decision = await self._decide_role()
                if decision.kind is RoleKind.TRAIN:
                    logger.info("taking the training role: %s", decision.reason)
                    await self._pause_serving(True)
                    await self._one_at_a_time(self.join)(TrainJoinParams())
                    self._auto = True
            except (VolunteerError, RecordError) as exc:
                logger.info("the training role is not taken now: %s", exc)
                await self._pause_serving(False)

    async def _decide_role(self) -> RoleDecision:
        model = await self._model()
        jobs = await read_jobs_on_node(self._dht.node, model.swarm_name, timeout_s=DHT_TIMEOUT_S)
        per_block: list[float] = []
        if self._settings.num_blocks != 0:
            per_block = (await self._blocks.read_snapshot()).block_throughput()
        return choose_role(
            RoleInputs(
                is_serving_allowed=self._settings.num_blocks != 0,
                is_training_allowed=True,
                weakest_block_tps=min(per_block) if per_block else 0.0,
                wanted_block_tps=WANTED_BLOCK_TPS,
                has_training_swarm=bool(jobs),
            )
        )

    async def _pause_serving(self, is_paused: bool) -> None:
        """Serving gives way to training (its blocks handed over first), and back."""
        if is_paused == self._paused or self._blocks.handler is None:
            return
        await self._blocks.control.set_paused(is_paused, by="training" if is_paused else None)
        self._paused = is_paused

    def status(self) -> TrainingStatus:
        return self.train_status_now()

    async def train_status(self, params: NoParams) -> TrainingStatus:
        return self.train_status_now()

    def train_status_now(self) -> TrainingStatus:
        update: dict[str, object] = {"training_losses": list(self._losses)}
        if self._losses:
            update["training_loss"] = self._losses[-1][1]
        if self._driver is not None:
            update["training_step"] = self._driver.step
            update["training_banned"] = sorted(self._driver.banned)
        if self._peer is not None:
            start, end = self._peer.job.stages[self._peer.stage]
            update.update(
                training_stage=self._peer.stage,
                training_blocks=(start, end),
                training_step=self._peer.trainer.steps,
            )
            if self._peer.trainer.steps >= self._peer.job.steps:
                update["training_state"] = "done"
        return self._status.model_copy(update=update)

    # Roles.

    async def join(self, params: TrainJoinParams) -> TrainingStatus:
        """Control method: becomes a stage peer of a job (module doc)."""
        model, jobs = await self._jobs_to_take()
        who = f" by {params.creator}" if params.creator else ""
        for creator, job in jobs:
            if params.creator not in (None, creator) or not job.may_drive(creator, creator):
                continue
            members = await read_members_on_node(self._dht.node, job, timeout_s=DHT_TIMEOUT_S)
            # A finished job's record outlives it a little; its peers say it is done.
            if not is_done(job, members or {}):
                break
        else:
            raise SettingsError(f"no unfinished training job{who} for {model.swarm_name}")
        members = members or {}
        counts = _stage_counts(job, members)
        stage = params.stage
        if stage is None:
            stage = min(range(len(job.stages)), key=lambda s: (counts[s], s))
        elif stage >= len(job.stages):
            raise SettingsError(f"the job has {len(job.stages)} stages")
        attacks = self._settings.faults.training_attacks()
        work = self._blocks.stats.work

        def build() -> TrainingPeer:
            from volunteer.models.checkpoint import load_ends, load_span

            torch.set_num_threads(self._settings.threads or torch.get_num_threads())
            ends = load_ends(model.folder, model.config).requires_grad_(False)
            return TrainingPeer(
                p2p=self._dht.p2p,
                job=job,
                stage=stage,
                span_for=lambda start, end: load_span(model.folder, model.config, start, end),
                ends=ends,
                drivers=frozenset(job.drivers or {creator}),
                signer=self._signer,
                drill=AttackDrill(attacks, seed=hash(self._dht.peer_id) & 0xFFFF),
                on_pass=lambda driver, tokens: work.add(driver, "training", "", tokens),
                on_accuse=self._accuse,
            )

        peer = await asyncio.to_thread(build)
        await peer.start()
        self._peer, self._job = peer, job
        self._begin("peer", job, creator=creator)
        self._own(self._announce_member(peer), "stage member announce")
        logger.info("joined training job %s as a peer of stage %d", job.job_id, stage)
        return self.train_status_now()

    async def leave(self, params: NoParams) -> TrainingStatus:
        """Control method: ends this daemon's role for good (idempotent): a job it
        drove is not driven on after a restart, nor by its backups."""
        was_driving = self._driver is not None
        status = await self._end_role()  # first: no step's record may follow the last one
        read = await asyncio.to_thread(read_record, self._paths)
        forget_record(self._paths)
        if was_driving and read is not None:
            record, job = read
            await self._mirror(job, record.model_copy(update={"ended": True}))
        return status

    async def _end_role(self) -> TrainingStatus:
        self._auto = False
        tasks, self._tasks = self._tasks, set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The last of the role stays shown: its step, stage, losses and bans.
        self._status = self.train_status_now()
        if self._peer is not None:
            await self._peer.stop()
            self._peer = None
        self._driver = None
        self._standing, self._is_standing = None, False
        if self._status.training_state in ("running", "waiting"):
            self._status = self._status.model_copy(update={"training_state": "left"})
        with contextlib.suppress(VolunteerError):
            await self._pause_serving(False)
        return self.train_status_now()

    # Helpers.

    async def _jobs_to_take(self) -> tuple[ServedModel, list[tuple[str, TrainingJob]]]:
        """For a role about to be taken: the daemon's model, and the jobs announced for it
        (with their announcers).

        Raises:
            SettingsError: this daemon has a role already, or the DHT did not answer.
        """
        self._check_idle()
        model = await self._model()
        jobs = await read_jobs_on_node(self._dht.node, model.swarm_name, timeout_s=DHT_TIMEOUT_S)
        if jobs is None:
            raise SettingsError("the DHT did not answer; try again")
        return model, jobs

    def _one_at_a_time(
        self, method: Callable[[Any], Awaitable[T]]
    ) -> Callable[[Any], Awaitable[T]]:
        """`method`, run while no other role is being taken or left: each checks that
        the daemon is idle, then awaits (the DHT, the data) before it takes the role."""

        async def run(params: Any) -> T:
            async with self._role_lock:
                return await method(params)

        return run

    def _has_role(self) -> bool:
        return self._driver is not None or self._peer is not None or self._is_standing

    def _check_idle(self) -> None:
        if self._has_role():
            raise SettingsError(
                "this daemon already has a training role; `volunteer train leave` first"
            )

    async def _model(self) -> ServedModel:
        if self._blocks.model is not None:
            return self._blocks.model
        return await asyncio.to_thread(open_model, self._settings.model, self._paths.models_dir)

    def _begin(self, role: str, job: TrainingJob, *, creator: str | None) -> None:
        self._losses.clear()
        self._status = TrainingStatus(
            training_role=role,
            training_state="running" if role == "peer" else "waiting",
            training_job=job.job_id,
            training_creator=creator,
            training_steps=job.steps,
        )

    def _own(self, work: object, name: str) -> asyncio.Task[None]:
        task = asyncio.ensure_future(work)
        task.set_name(name)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        return task

    def _finished(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        error = task.exception()
        if error is not None:
            logger.error("%s failed: %s", task.get_name(), error)
            self._status = self._status.model_copy(
                update={"training_state": "failed", "training_error": str(error)[:300]}
            )

    async def _announce_member(self, peer: TrainingPeer) -> None:
        while True:
            member = StageMember(job_id=peer.job.job_id, stage=peer.stage, steps=peer.trainer.steps)
            await announce_member_on_node(
                self._dht.node, peer.job, member, owner=self._owner,
                expiration_s=3 * ANNOUNCE_PERIOD_S, timeout_s=DHT_TIMEOUT_S,
            )  # fmt: skip
            await self._refresh_counts(peer.job)
            await asyncio.sleep(ANNOUNCE_PERIOD_S)

    async def _refresh_counts(self, job: TrainingJob) -> dict[str, StageMember]:
        members = await read_members_on_node(self._dht.node, job, timeout_s=DHT_TIMEOUT_S)
        if members is None:
            return {}
        self._status = self._status.model_copy(
            update={"training_stage_peers": _stage_counts(job, members)}
        )
        return members


def _stage_counts(job: TrainingJob, members: dict[str, StageMember]) -> list[int]:
    counts = [0] * len(job.stages)
    for member in members.values():
        counts[member.stage] += 1
    return counts
