"""The driver role of the daemon's training service (a mixin of `TrainingService`):
creating a job, driving it step by step, saving its result, and driving it on after
the daemon restarts.

After every step the driver writes `<data dir>/training/driving.json`: the request the
job came from, the job, the step, the bans and the losses. A daemon that starts and
finds it announces the job again and drives it on from that step: its stage peers wait
for their driver and are brought back at that step (a peer that summed part of a step
that never ended forgets it first; one that is elsewhere takes a peer's state). The
data file must still hold the job's data (its sha256 is checked). A job that is done,
or left with `volunteer train leave`, removes the file. Each record also goes to the
job's backup drivers (`volunteer.daemon.training_standby`), and a driver that comes
back while one of them drives its job stands by instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable
from pathlib import Path

import pydantic
import torch

from volunteer.client.receipt_sender import ReceiptSender
from volunteer.control.messages import TrainCreateRequest, TrainingStatus, first_problem
from volunteer.daemon.credit_service import CreditService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.training_result import result_place, save_result
from volunteer.daemon.training_shards import serve_shards
from volunteer.errors import SettingsError, VolunteerError
from volunteer.machine.atomic import write_file_atomic
from volunteer.model_cache.served_model import ServedModel
from volunteer.paths import Paths
from volunteer.swarm.records import RecordError
from volunteer.training.data import (
    DataError,
    check_shards,
    folder_tokenizer,
    load_rows,
    shard_hash,
    split_shards,
)
from volunteer.training.driver import Driver
from volunteer.training.job import Aggregation, DataShard, Optimizer, TrainingJob
from volunteer.training.records import StageMember, publish_job_on_node
from volunteer.training.step_types import Applying, PeerWork, TrainingStalled

ANNOUNCE_PERIOD_S = 5.0
DHT_TIMEOUT_S = 10.0
WAIT_FOR_PEERS_S = 1.0
MAX_RECORD_BYTES = 1 << 20
JOB_DONE = "the job is done"
"""Why a driver must not drive a job on: its peers took the last step."""

logger = logging.getLogger(__name__)


class PendingApply(pydantic.BaseModel):
    """A stage's `Applying`, as `driving.json` holds it."""

    model_config = pydantic.ConfigDict(extra="forbid")

    stage: int = pydantic.Field(ge=0)
    round: int = pydantic.Field(ge=0)
    included: dict[str, int]


class DriveRecord(pydantic.BaseModel):
    """What `driving.json` holds (module doc)."""

    model_config = pydantic.ConfigDict(extra="forbid")

    request: TrainCreateRequest
    job: dict
    step: int = pydantic.Field(ge=0)
    banned: dict[str, int] = {}
    losses: list[tuple[int, float]] = []
    pending: list[PendingApply] = []
    """Set while step `step` is applied: what each stage applies, to finish it."""
    ended: bool = False
    """The driver left the job for good (a backup is told so, and drives nothing)."""
    epoch: int = pydantic.Field(default=0, ge=0, lt=2**31)
    """Takeovers of the job by a backup so far (`Driver.epoch`)."""


class Driving:
    """The driver half of `TrainingService` (see the module)."""

    _paths: Paths
    _dht: DHTService
    _credit: CreditService
    _owner: bytes
    _driver: Driver | None
    _job: TrainingJob | None
    _status: TrainingStatus
    _losses: collections.deque[tuple[int, float]]
    _is_banned: Callable[[str], bool]
    _serving_data: bool
    # Also the service's: _check_idle, _model, _begin, _own, _refresh_counts and
    # train_status_now; `Standby`'s: _mirror, _driven_elsewhere, _why_not_drive,
    # _outdriven, _stand_by_for and _stand_down.

    async def create(self, request: TrainCreateRequest) -> TrainingStatus:
        """Control method: announces and drives a new job (module doc)."""
        self._check_idle()
        if not Path(request.data).is_absolute():
            raise SettingsError(f"the data file must be an absolute path, not {request.data}")
        if request.batch_size % request.microbatch_size:
            raise SettingsError("the batch size must be a multiple of the microbatch size")
        model = await self._model()
        blocks = model.config.num_layers
        if request.stages > blocks:
            raise SettingsError(f"{model.swarm_name} has {blocks} blocks: at most that many stages")
        rows = await self._rows(request.data, request.sequence_length, model)
        me = self._dht.peer_id
        if me in request.backups:
            raise SettingsError("this daemon drives the job: it is not its own backup")
        try:
            job = new_job(request, model, rows, drivers=(me, *request.backups))
        except pydantic.ValidationError as exc:
            raise SettingsError(first_problem(exc)) from None
        result_place(self._paths, job, request.save_as)
        self._start_driving(request, job, rows, model, DriveRecord(request=request,
                            job=job.to_wire(), step=0))  # fmt: skip
        await self._keep_record(request, job, 0, [], [])  # from the start: a restart drives on
        logger.info("training job %s: %d stages, %d steps", job.job_id, len(job.stages), job.steps)
        return self.train_status_now()

    async def resume(self, _params: object = None) -> None:
        """Drives on the job `driving.json` names, if any (module doc)."""
        read = await asyncio.to_thread(read_record, self._paths)
        if read is None:
            return
        record, job = read
        try:
            model = await self._model()
            rows = await self._job_rows(record.request.data, job, model)
        except VolunteerError as exc:
            self._begin("driver", job, creator=_creator(job, self._dht.peer_id))
            self._status = self._status.model_copy(update={
                "training_state": "failed", "training_error": f"cannot drive on: {exc}"[:300]
            })  # fmt: skip
            return
        # Two reads: a daemon just started may not reach the whole DHT at once. A
        # driver back while another drives, or after another drove past its record,
        # stands by.
        if job.drivers:
            why = await self._why_not_drive(job, record)
            elsewhere = why is None and await self._driven_elsewhere(job, reads=2)
            if why == JOB_DONE:  # another driver finished it meanwhile
                self._stand_by_for(job, rows, model, record)
                self._stand_down("done")
                return
            if elsewhere or why is not None:
                self._stand_by_for(job, rows, model, record)
                logger.info("training job %s: another drives it; standing by", job.job_id)
                return
        self._start_driving(record.request, job, rows, model, record)
        logger.info("training job %s: driven on from step %d", job.job_id, record.step)

    async def _rows(self, data: str, sequence_length: int, model: ServedModel) -> torch.Tensor:
        try:
            return await asyncio.to_thread(
                load_rows, Path(data), sequence_length=sequence_length,
                vocab_size=model.config.vocab_size, tokenize=folder_tokenizer(model.folder),
            )  # fmt: skip
        except VolunteerError as exc:
            raise SettingsError(str(exc)) from None

    async def _job_rows(self, data: str, job: TrainingJob, model: ServedModel) -> torch.Tensor:
        """The rows of `data`, checked against the job's shards.

        Raises:
            SettingsError: unreadable, or not the job's data.
        """
        rows = await self._rows(data, job.sequence_length, model)
        try:
            check_shards(rows, job.shards)
        except DataError as exc:
            raise SettingsError(f"{data} does not hold job {job.job_id}'s data: {exc}") from None
        return rows

    def _start_driving(
        self,
        request: TrainCreateRequest,
        job: TrainingJob,
        rows: torch.Tensor,
        model: ServedModel,
        record: DriveRecord,
    ) -> None:
        sender = self._credit.receipt_sender(job.model)

        def receipt(work: PeerWork) -> None:
            sender.work_done(work.peer, "training", work.start, work.end, work.tokens,
                             checked=work.checked)  # fmt: skip

        async def settled(step: int, loss: float, applies: list[Applying]) -> None:
            # Written before any stage applies: a restart in between finishes the step.
            pending = [PendingApply(**dataclasses.asdict(each)) for each in applies]
            await self._keep_record(request, job, step, [*self._losses, (step, loss)], pending)

        self._job = job
        driver = self._driver = Driver(
            p2p=self._dht.p2p, job=job, data=rows, members={}, checks=request.checks,
            rebalance=request.rebalance, on_work=receipt, on_settled=settled,
            banned_outside=self._is_banned, epoch=record.epoch,
        )  # fmt: skip
        driver.step, driver.banned = record.step, dict(record.banned)
        self._begin("driver", job, creator=_creator(job, self._dht.peer_id))
        self._losses.extend(record.losses)
        pending = [Applying(p.stage, p.round, dict(p.included)) for p in record.pending]
        announce = self._own(self._announce_job(job), "training job announce")
        if len(job.drivers) > 1 and not self._serving_data:  # backups may fetch the data
            self._own(self._serve_data(job, rows), "training data for backups")
        drive = self._drive(driver, sender, request, model, announce, pending)
        # However it ends: a driver that failed or gave way must not look alive.
        self._own(drive, "training driver").add_done_callback(lambda _: announce.cancel())

    async def _serve_data(self, job: TrainingJob, rows: torch.Tensor) -> None:
        self._serving_data = True  # once per role: a driver that gave way drives again
        try:
            await serve_shards(self._dht.p2p, job, rows)
        finally:
            self._serving_data = False

    async def _announce_job(self, job: TrainingJob) -> None:
        while True:
            await publish_job_on_node(
                self._dht.node, job, owner=self._owner,
                expiration_s=3 * ANNOUNCE_PERIOD_S, timeout_s=DHT_TIMEOUT_S,
            )  # fmt: skip
            await self._refresh_counts(job)
            await asyncio.sleep(ANNOUNCE_PERIOD_S)

    async def _drive(
        self,
        driver: Driver,
        sender: ReceiptSender,
        request: TrainCreateRequest,
        model: ServedModel,
        announce: asyncio.Task[None],
        pending: list[Applying],
    ) -> None:
        job = driver.job
        while driver.step < job.steps:
            members: dict[str, StageMember] = await self._refresh_counts(job)
            why = self._outdriven(driver, bool(pending), members) if len(job.drivers) > 1 else None
            if why is not None:  # two drivers at once: one gives way (`training_standby`)
                logger.warning("training job %s: %s; standing by", job.job_id, why)
                read = await asyncio.to_thread(read_record, self._paths)
                self._driver = None
                self._stand_by_for(job, driver.data, model, read[0] if read else None)
                return
            for peer, member in members.items():
                if peer not in driver.members:
                    logger.info("peer %s joined stage %d at step %d", peer, member.stage,
                                driver.step)  # fmt: skip
                    driver.add_member(peer, member.stage)
            known = set(driver.members.values())
            if pending and all(each.stage in known for each in pending):
                # A step settled before a restart: its peers apply it now.
                await driver.finish_apply(pending)
                pending = []
                await self._keep_record(request, job, driver.step, list(self._losses), [])
            for peer in [p for p in driver.failed if p not in members]:
                driver.remove_member(peer)
            # Until the first step, each stage waits for `min_peers`; then for one.
            # (Peers that failed count: the step brings back those that answer.)
            least = 1 if driver.step else request.min_peers
            count = collections.Counter(
                stage for peer, stage in driver.members.items() if peer not in driver.banned
            )
            if any(count[stage] < least for stage in range(len(job.stages))):
                await asyncio.sleep(WAIT_FOR_PEERS_S)
                continue
            began = time.perf_counter()
            try:
                report = await driver.run_step()
            except TrainingStalled as exc:
                logger.warning("training step %d stalled: %s; waiting for peers", driver.step, exc)
                await asyncio.sleep(WAIT_FOR_PEERS_S)
                continue
            self._losses.append((report.step, report.loss))
            speed = job.batch_size / max(time.perf_counter() - began, 1e-6)
            self._status = self._status.model_copy(
                update={"training_state": "running", "training_samples_per_s": speed}
            )
            logger.info("training step %d: loss %.4f", report.step, report.loss)
            await self._keep_record(request, job, driver.step, list(self._losses), [])
        announce.cancel()  # a finished job leaves the DHT: nobody joins it any more
        with contextlib.suppress(Exception):
            await sender.close()
        update: dict[str, object] = {"training_state": "done"}
        name = request.save_as or f"train-{job.job_id}"
        loss = self._losses[-1][1] if self._losses else None
        try:
            place = await save_result(driver, self._paths, model.config, name,
                                      model_folder=model.folder, loss=loss,
                                      data=Path(request.data).name)  # fmt: skip
            kind = "adapter" if job.trains == "lora" else "model"
            update["training_result"] = f"{kind} {name} ({place})"
        except (VolunteerError, OSError) as exc:  # the result's, the store's, a full disk
            update["training_error"] = f"the result was not saved: {exc}"
        self._status = self._status.model_copy(update=update)
        forget_record(self._paths)

    async def _keep_record(
        self,
        request: TrainCreateRequest,
        job: TrainingJob,
        step: int,
        losses: list[tuple[int, float]],
        pending: list[PendingApply],
    ) -> None:
        driver = self._driver
        record = DriveRecord(request=request, job=job.to_wire(), step=step,
                             banned=driver.banned if driver else {}, losses=losses,
                             pending=pending, epoch=driver.epoch if driver else 0)  # fmt: skip
        await write_record(self._paths, record)
        await self._mirror(job, record)


async def write_record(paths: Paths, record: DriveRecord) -> None:
    """Keeps `record` as `driving.json`; a full disk is logged: the job goes on."""
    try:
        await asyncio.to_thread(
            write_file_atomic, _record_path(paths), record.model_dump_json().encode()
        )
    except (OSError, VolunteerError) as exc:
        logger.warning("could not record the training job's step: %s", exc)


def read_record(paths: Paths) -> tuple[DriveRecord, TrainingJob] | None:
    """The record of the job this daemon drove, and the job; None if there is none, or
    (said in the log) it is damaged: a job is never driven on from a record that does
    not hold together."""
    path = _record_path(paths)
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_RECORD_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.error("cannot read %s, so no job is driven on: %s", path, exc)
        return None
    try:
        return parse_record(raw)
    except (ValueError, RecordError) as exc:
        logger.error("%s is damaged, so no job is driven on: %s", path, exc)
        return None


def parse_record(raw: bytes) -> tuple[DriveRecord, TrainingJob]:
    """A drive record and its job, checked to hold together.

    Raises:
        ValueError: over `MAX_RECORD_BYTES`, malformed, or inconsistent (pydantic's
            errors are ValueErrors).
        RecordError: its job is not a valid job.
    """
    if len(raw) > MAX_RECORD_BYTES:
        raise ValueError(f"it is over {MAX_RECORD_BYTES} bytes")
    record = DriveRecord.model_validate_json(raw)
    job = TrainingJob.from_wire(record.job)
    if record.step > job.steps or any(
        each.stage >= len(job.stages) or not each.included for each in record.pending
    ):
        raise ValueError("its step or pending applies are not the job's")
    return record, job


def new_job(
    request: TrainCreateRequest, model: ServedModel, rows: torch.Tensor, drivers: tuple[str, ...]
) -> TrainingJob:
    """The job `request` asks for, on `rows`; `drivers` who may drive it, in order (one
    alone: whoever announces it).

    Raises:
        pydantic.ValidationError: a field out of bounds (a backup's malformed peer id).
    """
    blocks = model.config.num_layers
    bounds = [round(i * blocks / request.stages) for i in range(request.stages + 1)]
    return TrainingJob(
        model=model.swarm_name,
        num_blocks=blocks,
        trains="lora" if request.lora_rank else "blocks",
        lora_rank=request.lora_rank,
        stages=tuple(itertools.pairwise(bounds)),
        shards=tuple(
            DataShard(sha256=shard_hash(shard), sequences=len(shard))
            for shard in split_shards(rows, request.shards)
        ),
        sequence_length=request.sequence_length,
        batch_size=request.batch_size,
        microbatch_size=request.microbatch_size,
        optimizer=Optimizer(name=request.optimizer, lr=request.lr),
        aggregation=Aggregation(kind=request.aggregation, tau=request.tau),
        seed=request.seed,
        steps=request.steps,
        drivers=drivers if len(drivers) > 1 else (),
    )


def _creator(job: TrainingJob, me: str) -> str:
    """Who created `job` (its first driver), as `train status` shows it."""
    return job.drivers[0] if job.drivers else me


def forget_record(paths: Paths) -> None:
    """Removes `driving.json`: no job to drive on after a restart."""
    with contextlib.suppress(FileNotFoundError):
        _record_path(paths).unlink()


def _record_path(paths: Paths) -> Path:
    return paths.data_dir / "training" / "driving.json"
