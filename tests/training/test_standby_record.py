"""Backup drivers (`daemon.training_standby`): what a backup takes from the network
(`accepted_record`: its job's record from one of the job's drivers, never older than
the one it keeps; anything else is refused, saying why), and when it may drive the job
on (`why_not_drive_on`)."""

from __future__ import annotations

import pytest

from tests.training.swarm_helpers import tiny_data, tiny_job
from volunteer.control.messages import TrainCreateRequest
from volunteer.daemon.training_driving import JOB_DONE, MAX_RECORD_BYTES, DriveRecord, PendingApply
from volunteer.daemon.training_standby import accepted_record, why_not_drive_on
from volunteer.swarm.records import RecordError
from volunteer.training import wire
from volunteer.training.job import Aggregation, TrainingJob
from volunteer.training.records import StageMember

CREATOR, BACKUP, STRANGER = ("Qm" + c * 44 for c in "abc")


def _job(**changes: object) -> TrainingJob:
    job = tiny_job(tiny_data(64, rows=12, sequence=8), aggregation=Aggregation(kind="mean"))
    return job.model_copy(update={"drivers": (CREATOR, BACKUP), **changes})


def _record(job: TrainingJob, step: int = 3, *, pending: bool = False) -> DriveRecord:
    applies = [PendingApply(stage=1, round=0, included={"QmPeer": 4})] if pending else []
    return DriveRecord(request=TrainCreateRequest(data="/theirs.npy"), job=job.to_wire(),
                       step=step, losses=[(0, 4.0)], pending=applies)  # fmt: skip


def _body(record: DriveRecord | str) -> bytes:
    text = record if isinstance(record, str) else record.model_dump_json()
    return wire.pack({"op": "record", "record": text})


def test_a_drivers_record_is_taken_and_a_newer_one_after_it() -> None:
    job = _job()
    first = accepted_record(job, CREATOR, _body(_record(job)), None)
    assert first == _record(job)
    # The step's applies come after the step's start, the next step after both; the
    # backup that drove on sends its records to the creator the same way.
    applying = accepted_record(job, BACKUP, _body(_record(job, pending=True)), first)
    assert accepted_record(job, CREATOR, _body(_record(job, 4)), applying).step == 4
    assert accepted_record(job, CREATOR, _body(_record(job)), first) == first  # sent again


@pytest.mark.parametrize(
    ("peer", "body", "kept", "says"),
    [
        (STRANGER, _body(_record(_job())), None, "only the job's drivers"),
        (CREATOR, _body(_record(_job(seed=99))), None, "a record of job"),
        (CREATOR, _body(_record(_job(), 2)), _record(_job(), 3), "older"),
        (CREATOR, _body(_record(_job())), _record(_job(), pending=True), "older"),
        (CREATOR, _body(_record(_job(), 999)), None, "not the job's"),
        (CREATOR, _body("{not json"), None, "JSON"),
        (CREATOR, _body(" " * (MAX_RECORD_BYTES + 1)), None, "over"),
        (CREATOR, wire.pack({"op": "record"}), None, "record"),
        (CREATOR, wire.pack({"op": "record", "record": 5}), None, "record"),
        (CREATOR, b"\x00junk", None, "not a training message"),
    ],
)
def test_anything_else_is_refused_saying_why(
    peer: str, body: bytes, kept: DriveRecord | None, says: str
) -> None:
    with pytest.raises((ValueError, RecordError, wire.WireError), match=says):
        accepted_record(_job(), peer, body, kept)


def _members(job: TrainingJob, stage0: tuple[int, ...], stage1: tuple[int, ...]) -> dict:
    """Announced stage peers: the steps of stage 0's, then of stage 1's."""
    steps = [(0, at) for at in stage0] + [(1, at) for at in stage1]
    return {
        f"peer{i}": StageMember(job_id=job.job_id, stage=stage, steps=at)
        for i, (stage, at) in enumerate(steps)
    }


def test_a_backup_drives_on_only_from_a_record_the_peers_are_not_past() -> None:
    job = _job()  # 6 steps
    record = _record(job, 3)
    assert why_not_drive_on(job, record, _members(job, (3, 3), (3,))) is None
    # One hostile peer announcing any step does not stop it; most of a stage's peers
    # past it do (it missed records: it would run their steps again, counting their
    # data twice), even where most of all peers are not.
    assert why_not_drive_on(job, record, _members(job, (3, 3), (3, 3, 5))) is None
    assert "stage 1 peers are past" in why_not_drive_on(job, record, _members(job, (3, 3, 3), (4,)))
    # Stopped while applying step 3, some stages applied it already.
    applying = _record(job, 3, pending=True)
    assert why_not_drive_on(job, applying, _members(job, (3, 3), (4, 4))) is None
    assert "past" in why_not_drive_on(job, applying, _members(job, (5, 5), (3,)))
    # A daemon cut off from the swarm sees no stage peers: it does not drive.
    assert "no peer of stage 1" in why_not_drive_on(job, record, _members(job, (3,), ()))
    assert "no peer of stage 0" in why_not_drive_on(job, record, {})
    assert "no record" in why_not_drive_on(job, None, _members(job, (3,), (3,)))
    assert why_not_drive_on(job, record, _members(job, (6, 6), (2,))) == JOB_DONE
