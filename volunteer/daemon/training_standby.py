"""Backup drivers (a mixin of `TrainingService`): a job may name, after its creator,
daemons it trusts to drive it on if the creator is gone for good (`volunteer train
create --backup PEER`); the stage peers obey any of them.

A backup stands by with `volunteer train standby [DATA]`: its copy of the data must
hash to the job's shards, or without one it fetches them from the driving daemon
(`training_shards`). The driving daemon sends each backup the record it keeps after
every step and before every apply (`training_driving.DriveRecord`: step, bans, losses,
the applies under way); the backup keeps it, as its own `driving.json`, with its own
data path. When no record came in and no driver of the job announced it for
`MISSED_READS` DHT reads in a row (the announcement lives three announce periods after
its driver died), plus one more read for each driver ahead of it in the job's list (so
two backups do not take over at once), it drives the job on from that record, as a
driver does after a restart, unless `why_not_drive_on` says otherwise (no record, a
stage's peers past it, or none in sight). Each takeover counts one more epoch; the
stage peers obey the driver of the latest epoch (then the one earlier in the job's
list) and refuse the others (`TrainingPeer._obey`), so two drivers at once never both
move them, and the one refused gives way and stands by (`_outdriven`). A driver that
comes back while another drives its job stands by too (`Driving.resume`); one that
leaves the job for good tells its backups, which stand down.
"""

from __future__ import annotations

import asyncio
import collections
import logging

import torch

from volunteer.control.messages import TrainingStatus, TrainStandbyParams
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.training_driving import (
    ANNOUNCE_PERIOD_S,
    DHT_TIMEOUT_S,
    JOB_DONE,
    MAX_RECORD_BYTES,
    DriveRecord,
    forget_record,
    parse_record,
    write_record,
)
from volunteer.daemon.training_result import result_place
from volunteer.daemon.training_shards import fetch_shards
from volunteer.errors import SettingsError
from volunteer.model_cache.served_model import ServedModel
from volunteer.paths import Paths
from volunteer.swarm.records import RecordError
from volunteer.training import wire
from volunteer.training.calls import TrainingCallError, call, refusal
from volunteer.training.driver import Driver
from volunteer.training.job import TrainingJob
from volunteer.training.records import (
    StageMember,
    is_done,
    read_jobs_on_node,
    read_members_on_node,
)
from volunteer.transport.one_shot import serve

STANDBY_HANDLE = "Train.standby"
MIRROR_TIMEOUT_S = 3.0
MAX_MIRROR_SKIPS = 64
"""Records skipped, at most, for a backup that did not take one (it may be gone)."""
MISSED_READS = 2

logger = logging.getLogger(__name__)


class Standby:
    """The backup-driver half of `TrainingService` (see the module)."""

    _paths: Paths
    _dht: DHTService
    _job: TrainingJob | None
    _status: TrainingStatus
    _losses: collections.deque[tuple[int, float]]
    _standing: DriveRecord | None
    """The latest record a backup took (None: none yet, or not a backup)."""
    _is_standing: bool
    _heard: bool
    """Whether a record came in since the last look at the DHT."""
    _handlers: int
    """Standby handlers registered so far (a loop removes the handler only if it is
    still the one it registered)."""
    _mirror_skips: dict[str, tuple[int, int]]
    """Per backup that did not take a record: records still to skip, failures in a row."""
    # Also the service's: _jobs_to_take, _begin, _own, _job_rows, _start_driving and
    # train_status_now.

    async def standby(self, params: TrainStandbyParams) -> TrainingStatus:
        """Control method: stands by for the job naming this daemon a backup (module doc)."""
        model, jobs = await self._jobs_to_take()
        me = self._dht.peer_id
        named = [
            (announcer, job)
            for announcer, job in jobs
            if me in job.drivers[1:]
            and job.may_drive(announcer, announcer)
            and params.creator in (None, job.drivers[0])
        ]
        for each in list(named):  # a finished job's record outlives it a little
            members = await read_members_on_node(self._dht.node, each[1], timeout_s=DHT_TIMEOUT_S)
            if is_done(each[1], members or {}):
                named.remove(each)
        if not named:
            raise SettingsError(f"no unfinished training job of {model.swarm_name} names this "
                                f"daemon ({me}) a backup driver")  # fmt: skip
        announcer, job = named[0]
        data = params.data
        if data is None:  # fetched from the driving daemon, shard by shard
            place = self._paths.data_dir / "training" / f"{job.job_id}.npy"
            data = await fetch_shards(self._dht.p2p, announcer, job, place)
        rows = await self._job_rows(data, job, model)
        self._stand_by_for(job, rows, model, None, data=data)
        logger.info("standing by to drive training job %s on", job.job_id)
        return self.train_status_now()

    def _stand_by_for(
        self,
        job: TrainingJob,
        rows: torch.Tensor,
        model: ServedModel,
        record: DriveRecord | None,
        *,
        data: str | None = None,
    ) -> None:
        """Stands by for `job` (its data `rows`, at `data` or the record's), from
        `record` if it has one."""
        self._job, self._standing, self._is_standing = job, record, True
        self._begin("standby", job, creator=job.drivers[0])
        if record is not None:
            self._losses.extend(record.losses)
            self._status = self._status.model_copy(update={"training_step": record.step})
        where = data if record is None else record.request.data
        self._own(self._stand_by(job, rows, model, where), "training standby")

    async def _stand_by(
        self, job: TrainingJob, rows: torch.Tensor, model: ServedModel, data: str
    ) -> None:
        async def take(peer: str, body: bytes) -> bytes:
            try:
                return await self._take_record(job, peer, body, data)
            except (wire.WireError, ValueError, RecordError, SettingsError) as exc:
                return refusal(str(exc))

        handler = serve(take, max_request_bytes=MAX_RECORD_BYTES + 4096, max_serving=4)
        self._handlers += 1
        mine = self._handlers
        await self._dht.p2p.add_binary_stream_handler(STANDBY_HANDLE, handler)
        try:
            needed = MISSED_READS + job.drivers.index(self._dht.peer_id)
            missed = 0
            while True:
                await asyncio.sleep(ANNOUNCE_PERIOD_S)
                if not self._is_standing:
                    return  # the driver left the job, or it is done
                # A record that came in says a driver is alive, whatever the DHT shows.
                driven = self._heard or await self._driven_elsewhere(job)
                self._heard = False
                missed = 0 if driven else missed + 1
                if missed < needed:
                    continue
                why = await self._why_not_drive(job, self._standing)
                if why is None:
                    break
                if why == JOB_DONE:
                    self._stand_down("done")
                else:
                    self._waiting_because(why)
        finally:
            # A standby started after this one registered its own handler in its place.
            if self._handlers == mine:
                await self._dht.p2p.remove_binary_stream_handler(STANDBY_HANDLE)
        logger.warning("no driver announces training job %s: driving it on", job.job_id)
        record, self._standing, self._is_standing = self._standing, None, False
        assert record is not None  # checked by _why_not_drive
        # One takeover more: the stage peers obey this driver, not the one it follows.
        record = record.model_copy(update={"epoch": record.epoch + 1})
        self._start_driving(record.request, job, rows, model, record)

    async def _why_not_drive(self, job: TrainingJob, record: DriveRecord | None) -> str | None:
        """Why this daemon must not drive `job` on from `record` (`why_not_drive_on`);
        None: it may."""
        members = await read_members_on_node(self._dht.node, job, timeout_s=DHT_TIMEOUT_S)
        if members is None:
            return "the DHT did not answer"
        return why_not_drive_on(job, record, members)

    def _stand_down(self, state: str) -> None:
        self._is_standing = False
        forget_record(self._paths)
        update: dict[str, object] = {"training_state": state}
        if state == "done" and self._job is not None:
            update["training_step"] = self._job.steps
        self._status = self._status.model_copy(update=update)

    def _waiting_because(self, why: str) -> None:
        if self._status.training_error != why:
            logger.warning("standing by for training job: %s", why)
            self._status = self._status.model_copy(update={"training_error": why})

    async def _take_record(self, job: TrainingJob, peer: str, body: bytes, data: str) -> bytes:
        """Keeps a driver's record (module doc), with this daemon's `data` path.

        Raises:
            ValueError, RecordError, WireError: see `accepted_record`; or this daemon
                no longer stands by for the job.
            SettingsError: the result's name is bad or taken here.
        """
        if not self._is_standing or self._job is not job:
            raise ValueError("this daemon does not stand by for the job")
        record = accepted_record(job, peer, body, self._standing)
        result_place(self._paths, job, record.request.save_as)  # where it would save it
        self._heard = True
        if record.ended or record.step >= job.steps:
            # The job is done (its driver saves the result) or was left: nothing to drive.
            self._stand_down("left" if record.ended else "done")
        else:
            request = record.request.model_copy(update={"data": data})
            self._standing = record.model_copy(update={"request": request})
            await write_record(self._paths, self._standing)
        self._losses.clear()
        self._losses.extend(record.losses)
        self._status = self._status.model_copy(
            update={"training_step": record.step, "training_error": None}
        )
        return wire.pack({"kept": record.step})

    async def _driven_elsewhere(self, job: TrainingJob, *, reads: int = 1) -> bool:
        """Whether another of `job`'s drivers announces it, in any of `reads` DHT reads
        an announce period apart (a DHT that does not answer counts as yes: nobody
        drives on a guess)."""
        if len(job.drivers) < 2:
            return False
        me = self._dht.peer_id
        for read in range(reads):
            if read:
                await asyncio.sleep(ANNOUNCE_PERIOD_S)
            jobs = await read_jobs_on_node(self._dht.node, job.model, timeout_s=DHT_TIMEOUT_S)
            if jobs is None or any(
                each.job_id == job.job_id and peer != me and job.may_drive(peer, peer)
                for peer, each in jobs
            ):
                return True
        return False

    def _outdriven(
        self, driver: Driver, applying: bool, members: dict[str, StageMember]
    ) -> str | None:
        """Why this driving daemon should give way and stand by (None: it drives on):
        stage peers refused it for a later driver (`TrainingPeer._obey`), or most
        peers of a stage are past its step (another drove on while it was away)."""
        if driver.outdriven:
            return "the stage peers obey a later driver"
        if stage_past(driver.job, driver.step, applying, members) is not None:
            return "another driver drove the job past this one's step"
        return None

    async def _mirror(self, job: TrainingJob, record: DriveRecord) -> None:
        """Sends `record` to the job's other drivers (module doc), each bounded by
        `MIRROR_TIMEOUT_S`. One that does not take it (not standing by yet, or gone) is
        skipped for the next 1, 2, 4... records, at most `MAX_MIRROR_SKIPS`; the last
        record of a job goes to every one (those skipped would stand by for good)."""
        me = self._dht.peer_id
        final = record.ended or record.step >= job.steps
        due = []
        for peer in job.drivers:
            skips, failures = self._mirror_skips.get(peer, (0, 0))
            if peer != me and skips and not final:
                self._mirror_skips[peer] = (skips - 1, failures)
            elif peer != me:
                due.append(peer)
        body = {"op": "record", "record": record.model_dump_json()}
        replies = await asyncio.gather(
            *(call(self._dht.p2p, peer, body, handle=STANDBY_HANDLE, timeout_s=MIRROR_TIMEOUT_S,
                   max_answer_bytes=4096) for peer in due),
            return_exceptions=True,
        )  # fmt: skip
        for peer, reply in zip(due, replies, strict=True):
            if isinstance(reply, TrainingCallError):
                logger.info("backup driver %s did not take the record: %s", peer, reply)
                failures = self._mirror_skips.get(peer, (0, 0))[1]
                self._mirror_skips[peer] = (min(1 << failures, MAX_MIRROR_SKIPS), failures + 1)
            elif isinstance(reply, BaseException):
                raise reply
            else:
                self._mirror_skips.pop(peer, None)


def accepted_record(
    job: TrainingJob, peer: str, body: bytes, kept: DriveRecord | None
) -> DriveRecord:
    """The record in `body`, from `peer`, if a backup of `job` keeping `kept` takes it.

    Raises:
        WireError, ValueError, RecordError: not a record of `job` from one of its
            drivers, malformed, or older than `kept`.
    """
    header, _ = wire.unpack(body, max_tensors=0)
    if peer not in job.drivers:
        raise ValueError("only the job's drivers send its records")
    record, of = parse_record(wire.field(header, "record", str).encode())
    if of.job_id != job.job_id:
        raise ValueError(f"a record of job {of.job_id}, not {job.job_id}")
    # Within a step, the record naming its applies comes after the one without.
    if kept is not None and (record.step, bool(record.pending)) < (kept.step, bool(kept.pending)):
        raise ValueError(f"a record of step {record.step}, older than the one kept")
    return record


def why_not_drive_on(
    job: TrainingJob, record: DriveRecord | None, members: dict[str, StageMember]
) -> str | None:
    """Why a driver holding `record` must not drive `job` on, with its stage peers
    announcing `members` (None: it may): the job is done (`JOB_DONE`), there is no
    record, or most peers are past its step (it would run steps again and count their
    data twice), or a stage has no peer in sight. Most, not any: a hostile peer can
    announce any step."""
    if is_done(job, members):
        return JOB_DONE
    if record is None:
        return "no record from the job's driver yet: it cannot drive on"
    for stage in range(len(job.stages)):
        if not any(member.stage == stage for member in members.values()):
            # A daemon cut off from the swarm sees nobody: it must not drive.
            return f"no peer of stage {stage} is seen"
    stage = stage_past(job, record.step, bool(record.pending), members)
    if stage is not None:
        return f"its record is of step {record.step}, most stage {stage} peers are past it"
    return None


def stage_past(
    job: TrainingJob, step: int, applying: bool, members: dict[str, StageMember]
) -> int | None:
    """A stage most of whose announced peers are past `step`, or past the step after
    while it is `applying` (per stage: a driver that stopped while applying leaves
    stages at two steps); None if none is."""
    for stage in range(len(job.stages)):
        steps = [member.steps for member in members.values() if member.stage == stage]
        if 2 * sum(at > step + applying for at in steps) > len(steps):
            return stage
    return None
