"""The cost model's prediction for a span streamed from disk is set against the span's
own timed steps, and the read rate those steps showed becomes the disk's calibration,
which the next check (the next plan) starts from."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from volunteer.models.offload import OffloadedSpan
from volunteer.models.weight_format import WeightFormat

from tests.models.test_offload import disk_span, tiny_config
from volunteer.daemon.offload_check import check_offloaded_span, keep_lifetime_calibration
from volunteer.machine.calibration import load_calibration, save_calibration


@pytest.fixture
def span(tmp_path: Path) -> Iterator[OffloadedSpan]:
    offloaded = disk_span(tiny_config(), WeightFormat.parse("q4"), tmp_path / "blocks")
    try:
        yield offloaded
    finally:
        offloaded.close()


def test_a_check_predicts_times_and_calibrates(span: OffloadedSpan, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    threads = torch.get_num_threads()
    first = check_offloaded_span(span, 1, cache_dir, "blocks 0:5 in q4g32")
    assert torch.get_num_threads() == threads  # the caller's count is restored
    assert first is not None
    assert first.planned_read.origin == "assumed: never measured here"
    assert first.predicted_tps > 0 and first.measured_tps > 0 and first.read_bytes_s > 0
    kept = load_calibration(cache_dir)
    assert kept is not None and kept.read_bytes_s == first.read_bytes_s
    assert kept.source == "blocks 0:5 in q4g32"
    second = check_offloaded_span(span, 1, cache_dir, "blocks 0:5 in q4g32")
    assert second is not None
    assert second.planned_read.origin == "calibrated while serving"
    assert second.planned_read.bytes_s == first.read_bytes_s
    text = second.describe()
    assert f"predicted {second.predicted_tps:.2f} tokens/s" in text
    assert f"measured {second.measured_tps:.2f} tokens/s" in text


def test_the_prediction_follows_the_planned_read_rate(span: OffloadedSpan, tmp_path: Path) -> None:
    """A disk planned as very slow predicts read-bound steps at that rate, whatever the
    compute: tokens/s = rate / bytes per step."""
    cache_dir = tmp_path / "cache"
    save_calibration(cache_dir, 1000.0, "a very slow disk")
    check = check_offloaded_span(span, 1, cache_dir, "blocks 0:5 in q4g32")
    assert check is not None
    per_step = span.stream_stats.bytes_read / (span.stream_stats.blocks_read / span.num_blocks)
    assert check.predicted_tps == pytest.approx(1000.0 / per_step, rel=1e-6)
    assert check.measured_over_predicted > 1  # the real disk is faster than 1 kB/s


def test_the_lifetime_rate_replaces_the_first_check_on_stop(
    span: OffloadedSpan, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    check_offloaded_span(span, 1, cache_dir, "blocks 0:5 in q4g32")
    keep_lifetime_calibration(span, cache_dir, min_read_s=0.0)
    kept = load_calibration(cache_dir)
    assert kept is not None and kept.source == "blocks 0:5 while serving"
    assert kept.read_bytes_s == pytest.approx(span.stream_stats.read_bytes_per_s)


def test_too_little_reading_keeps_the_first_check(span: OffloadedSpan, tmp_path: Path) -> None:
    cache_dir = tmp_path / "cache"
    check_offloaded_span(span, 1, cache_dir, "blocks 0:5 in q4g32")
    keep_lifetime_calibration(span, cache_dir, min_read_s=3600.0)
    kept = load_calibration(cache_dir)
    assert kept is not None and kept.source == "blocks 0:5 in q4g32"
