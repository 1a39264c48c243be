"""The driver's record (`<data dir>/training/driving.json`, `daemon.training_driving`):
read back whole, and a damaged one is never driven on, with a line in the log."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.training.swarm_helpers import tiny_data, tiny_job
from volunteer.control.messages import TrainCreateRequest
from volunteer.daemon.training_driving import (
    MAX_RECORD_BYTES,
    DriveRecord,
    PendingApply,
    read_record,
)
from volunteer.paths import Paths
from volunteer.training.job import Aggregation


def _paths(tmp_path: Path) -> Paths:
    paths = Paths.resolve(home=tmp_path, env={})
    (paths.data_dir / "training").mkdir(parents=True)
    return paths


def _record(**changes: object) -> DriveRecord:
    job = tiny_job(tiny_data(64, rows=12, sequence=8), aggregation=Aggregation(kind="mean"))
    fields = {
        "request": TrainCreateRequest(data="/data.npy"), "job": job.to_wire(), "step": 3,
        "banned": {"QmLiar": 1}, "losses": [(0, 4.0), (1, 3.9), (2, 3.8)],
        "pending": [PendingApply(stage=1, round=0, included={"QmPeer": 4})],
    }  # fmt: skip
    return DriveRecord(**{**fields, **changes})


def test_a_record_reads_back_whole(tmp_path: Path) -> None:
    paths = _paths(tmp_path)
    assert read_record(paths) is None  # none written: nothing to drive on, and no error
    record = _record()
    (paths.data_dir / "training" / "driving.json").write_text(record.model_dump_json())
    read, job = read_record(paths)
    assert read == record and job.to_wire() == record.job


@pytest.mark.parametrize(
    ("content", "words"),
    [
        (b"{not json", "damaged"),
        (b"", "damaged"),
        (b'{"step": 1}', "damaged"),
        (_record().model_dump_json().encode()[:-40], "damaged"),
        (_record().model_dump_json().replace('"step":3', '"step":3,"extra":1').encode(), "extra"),
        (_record(step=99).model_dump_json().encode(), "not the job's"),
        (
            _record(pending=[PendingApply(stage=7, round=0, included={"QmPeer": 1})])
            .model_dump_json()
            .encode(),
            "not the job's",
        ),
        (_record(job={"model": "tiny-random"}).model_dump_json().encode(), "training job"),
        (b" " * (MAX_RECORD_BYTES + 1), "over"),
        (b"\xff\xfe\x00junk", "damaged"),
    ],
)
def test_a_damaged_record_is_not_driven_on_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, content: bytes, words: str
) -> None:
    paths = _paths(tmp_path)
    (paths.data_dir / "training" / "driving.json").write_bytes(content)
    with caplog.at_level(logging.ERROR, logger="volunteer.daemon.training_driving"):
        assert read_record(paths) is None
    assert words in caplog.text and "no job is driven on" in caplog.text
