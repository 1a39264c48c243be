"""The disk calibration a serving daemon keeps: preferred over the bench's figure while it
describes the disk under the cache folder, ignored (never an error) when it is damaged."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from volunteer.machine.calibration import (
    BENCH_FILE,
    CALIBRATION_FILE,
    DEFAULT_DISK_READ_BYTES_S,
    disk_read_estimate,
    load_calibration,
    save_calibration,
)
from volunteer.machine.microbench import CACHE_FORMAT


def _write_bench_cache(cache_dir: Path, read_bytes_s: float | None) -> None:
    path = cache_dir / BENCH_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"format": CACHE_FORMAT, "fingerprint": "x", "results": {}}
    record["results"]["disk_read_bytes_per_s"] = read_bytes_s
    path.write_text(json.dumps(record))


def test_a_kept_calibration_is_what_the_next_plan_reads(tmp_path: Path) -> None:
    _write_bench_cache(tmp_path, 3e9)
    assert disk_read_estimate(tmp_path).bytes_s == 3e9
    kept = save_calibration(tmp_path, 4.5e8, "blocks 0:30 in q4g32")
    loaded = load_calibration(tmp_path)
    assert loaded == kept
    estimate = disk_read_estimate(tmp_path, bench_bytes_s=3e9)
    assert (estimate.bytes_s, estimate.origin) == (4.5e8, "calibrated while serving")
    assert "450 MB/s, streaming blocks 0:30 in q4g32" in loaded.describe()


def test_without_a_calibration_the_bench_figure_then_a_default_is_used(tmp_path: Path) -> None:
    nothing = disk_read_estimate(tmp_path)
    assert nothing.bytes_s == DEFAULT_DISK_READ_BYTES_S and "never measured" in nothing.origin
    assert disk_read_estimate(tmp_path, bench_bytes_s=2e9).bytes_s == 2e9
    _write_bench_cache(tmp_path, 1.5e9)
    cached = disk_read_estimate(tmp_path)
    assert (cached.bytes_s, cached.origin) == (1.5e9, "the profile's disk bench")
    _write_bench_cache(tmp_path, None)  # the bench could not time the disk
    assert disk_read_estimate(tmp_path).bytes_s == DEFAULT_DISK_READ_BYTES_S


@pytest.mark.parametrize(
    "damage",
    [
        lambda record: "not json{",
        lambda record: json.dumps({**record, "read_bytes_s": -1.0}),
        lambda record: json.dumps({**record, "read_bytes_s": "fast"}),
        lambda record: json.dumps({k: v for k, v in record.items() if k != "source"}),
        lambda record: json.dumps({**record, "format": 99}),
        lambda record: json.dumps([record]),
    ],
    ids=["not-json", "negative", "not-a-number", "missing-field", "other-format", "a-list"],
)
def test_a_damaged_calibration_is_ignored_and_the_bench_figure_used(
    tmp_path: Path, damage, caplog: pytest.LogCaptureFixture
) -> None:
    save_calibration(tmp_path, 4e8, "blocks 0:5")
    path = tmp_path / CALIBRATION_FILE
    path.write_text(damage(json.loads(path.read_text())))
    with caplog.at_level(logging.WARNING):
        assert load_calibration(tmp_path) is None
        assert disk_read_estimate(tmp_path, bench_bytes_s=2e9).bytes_s == 2e9


def test_a_calibration_of_another_disk_is_not_this_ones(tmp_path: Path) -> None:
    save_calibration(tmp_path, 4e8, "blocks 0:5")
    path = tmp_path / CALIBRATION_FILE
    record = json.loads(path.read_text())
    path.write_text(json.dumps({**record, "device": record["device"] + 1}))
    assert load_calibration(tmp_path) is None


@pytest.mark.parametrize("rate", [0.0, -5.0, float("nan"), float("inf")])
def test_a_read_rate_that_is_not_one_is_refused(tmp_path: Path, rate: float) -> None:
    with pytest.raises(ValueError, match="positive"):
        save_calibration(tmp_path, rate, "blocks 0:5")
    assert not (tmp_path / CALIBRATION_FILE).exists()
