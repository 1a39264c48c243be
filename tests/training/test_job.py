"""Training job records (`volunteer.training.job`): what a creator announces survives
the wire, names itself by its content, and a stranger's malformed job is refused."""

from __future__ import annotations

import math
from typing import Any

import msgpack
import pytest

from volunteer.swarm.records import RecordError
from volunteer.training.job import (
    Aggregation,
    DataShard,
    Optimizer,
    TrainingJob,
    job_key,
)


def _job(**changes: Any) -> TrainingJob:
    fields: dict[str, Any] = {
        "model": "tiny-llama",
        "num_blocks": 4,
        "trains": "blocks",
        "stages": ((0, 2), (2, 4)),
        "shards": (DataShard(sha256="ab" * 32, sequences=100),),
        "sequence_length": 32,
        "batch_size": 12,
        "microbatch_size": 2,
        "optimizer": Optimizer(name="adamw", lr=1e-3),
        "aggregation": Aggregation(kind="centered-clip", tau=0.5),
        "seed": 7,
        "steps": 50,
    }
    return TrainingJob(**{**fields, **changes})


def _over_the_wire(wire: dict[str, Any]) -> TrainingJob:
    return TrainingJob.from_wire(msgpack.unpackb(msgpack.packb(wire)))


def test_a_job_survives_the_wire_and_keeps_its_id() -> None:
    job = _job()
    back = _over_the_wire(job.to_wire())
    assert back == job
    assert back.job_id == job.job_id
    assert len(job.job_id) == 16
    # A newer peer's extra field is ignored (and is not part of what peers agree on).
    assert _over_the_wire({**job.to_wire(), "comment": "hi"}).job_id == job.job_id


@pytest.mark.parametrize(
    "changes",
    [{"seed": 8}, {"steps": 51}, {"optimizer": Optimizer(name="adamw", lr=2e-3)}],
)
def test_any_change_is_another_job(changes: dict[str, Any]) -> None:
    assert _job(**changes).job_id != _job().job_id


def test_a_job_naming_its_drivers_is_driven_by_them_alone() -> None:
    """Without `drivers`, whoever announced a job drives it; with them, only they, in
    any announcement (a stranger re-announcing the job does not become its driver)."""
    creator, backup, stranger = ("Qm" + c * 44 for c in "abc")
    alone = _job()
    assert alone.may_drive(creator, creator) and not alone.may_drive(creator, stranger)
    named = _job(drivers=(creator, backup))
    assert named.job_id != alone.job_id
    assert named.may_drive(backup, creator) and named.may_drive(creator, stranger)
    assert not named.may_drive(stranger, stranger)
    assert _over_the_wire(named.to_wire()).drivers == (creator, backup)


def test_stage_of_finds_each_blocks_stage() -> None:
    job = _job(stages=((0, 1), (1, 4)))
    assert [job.stage_of(block) for block in range(4)] == [0, 1, 1, 1]
    with pytest.raises(ValueError):
        job.stage_of(4)


@pytest.mark.parametrize(
    ("changes", "says"),
    [
        ({"stages": [[0, 2], [3, 4]]}, "without gaps"),
        ({"stages": [[0, 3], [2, 4]]}, "without gaps"),
        ({"stages": [[0, 2], [2, 2], [2, 4]]}, "without gaps"),
        ({"stages": [[0, 2]]}, "end at block 2"),
        ({"stages": []}, "stages"),
        ({"trains": "lora"}, "lora_rank"),
        ({"lora_rank": 8}, "lora_rank"),
        ({"microbatch_size": 5}, "multiple"),
        ({"seed": "7"}, "seed"),
        ({"seed": -1}, "seed"),
        ({"steps": 0}, "steps"),
        ({"model": "bad model"}, "model"),
        ({"shards": [{"sha256": "xyz", "sequences": 1}]}, "sha256"),
        ({"shards": []}, "shards"),
        ({"optimizer": {"name": "adamw", "lr": math.nan}}, "lr"),
        ({"optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 1.5]}}, "betas"),
        ({"optimizer": {"name": "lion", "lr": 1e-3}}, "name"),
        ({"aggregation": {"kind": "centered-clip", "tau": 0.0}}, "tau"),
        ({"aggregation": {"kind": "median"}}, "kind"),
        ({"num_blocks": 10**9}, "num_blocks"),
        ({"drivers": ["not a peer id!"]}, "drivers"),
        ({"drivers": ["Qm" + "a" * 44, "Qm" + "a" * 44]}, "named twice"),
        ({"drivers": ["Qm" + "a" * 44 + str(i) for i in range(1, 10)]}, "drivers"),
        ({"drivers": "Qm" + "a" * 44}, "drivers"),
    ],
)
def test_a_malformed_job_is_refused_naming_the_problem(changes: dict[str, Any], says: str) -> None:
    with pytest.raises(RecordError, match=says):
        _over_the_wire({**_job().to_wire(), **changes})


@pytest.mark.parametrize("value", [None, [], "job", 5])
def test_a_job_that_is_not_a_dict_is_refused(value: object) -> None:
    with pytest.raises(RecordError, match="must be a dict"):
        TrainingJob.from_wire(value)


def test_jobs_are_announced_per_model() -> None:
    assert job_key("tiny-llama") == "tiny-llama.training"
    with pytest.raises(RecordError):
        job_key("no spaces allowed")
