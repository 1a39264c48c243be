"""What the offloading cost model should take for this machine's disk, learned from use.

`volunteer profile` times a read of a scratch file; a daemon streaming a span from disk
(`volunteer.models.offload`) then sees what reads really cost while it serves: the page
cache, the allocator and the other work on the machine included. That figure, once a
daemon has streamed, is kept here and preferred over the bench's for the next plan.

A calibration belongs to the disk under the cache folder: it is dropped when the folder
now lives on another device. A missing, corrupt or foreign file is ignored (the bench's
figure is used), never an error.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from pathlib import Path

from volunteer.machine.atomic import write_file_atomic
from volunteer.machine.microbench import CACHE_FORMAT as BENCH_FORMAT

logger = logging.getLogger(__name__)

CALIBRATION_FILE = Path("profile") / "calibration.json"
"""Under the cache folder, beside the bench's own cache (`profile/microbench.json`)."""
BENCH_FILE = Path("profile") / "microbench.json"
FORMAT = 1
DEFAULT_DISK_READ_BYTES_S = 0.5e9
"""Assumed where nothing was measured: a modest SSD."""


@dataclasses.dataclass(frozen=True)
class DiskCalibration:
    """The read rate a daemon's streamed span showed, and where it came from."""

    read_bytes_s: float
    source: str
    """What streamed, e.g. "blocks 0:30 in q4g32"."""
    measured_at: float
    """Unix time."""

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.measured_at))
        return f"{self.read_bytes_s / 1e6:.0f} MB/s, streaming {self.source} on {when}"


@dataclasses.dataclass(frozen=True)
class DiskReadEstimate:
    """The read rate to plan with, and why that one."""

    bytes_s: float
    origin: str


def save_calibration(cache_dir: Path, read_bytes_s: float, source: str) -> DiskCalibration:
    """Keeps a measured read rate for the next plan (atomically: a reader sees the old
    file or the new one)."""
    if not math.isfinite(read_bytes_s) or read_bytes_s <= 0:
        raise ValueError(f"a read rate must be positive, not {read_bytes_s!r}")
    calibration = DiskCalibration(read_bytes_s, source, time.time())
    cache_dir.mkdir(parents=True, exist_ok=True)
    record = {
        "format": FORMAT,
        "device": _device_of(cache_dir),
        **dataclasses.asdict(calibration),
    }
    write_file_atomic(cache_dir / CALIBRATION_FILE, json.dumps(record, indent=1).encode())
    return calibration


def load_calibration(cache_dir: Path) -> DiskCalibration | None:
    """The kept calibration of the disk under `cache_dir`, or None."""
    path = cache_dir / CALIBRATION_FILE
    try:
        record = json.loads(path.read_bytes())
        if record["format"] != FORMAT or record["device"] != _device_of(cache_dir):
            return None
        calibration = DiskCalibration(
            read_bytes_s=float(record["read_bytes_s"]),
            source=str(record["source"]),
            measured_at=float(record["measured_at"]),
        )
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        logger.warning("ignoring the unreadable disk calibration %s (%r)", path, exc)
        return None
    rate = calibration.read_bytes_s
    if not math.isfinite(rate) or rate <= 0:
        logger.warning("ignoring the disk calibration %s: a read rate of %r", path, rate)
        return None
    return calibration


def disk_read_estimate(cache_dir: Path, bench_bytes_s: float | None = None) -> DiskReadEstimate:
    """The disk read rate to plan with: a daemon's calibration, else the profile bench's
    figure (`bench_bytes_s`, or the one its cache holds), else DEFAULT_DISK_READ_BYTES_S."""
    calibration = load_calibration(cache_dir)
    if calibration is not None:
        return DiskReadEstimate(calibration.read_bytes_s, "calibrated while serving")
    if bench_bytes_s is None:
        bench_bytes_s = _cached_bench_read(cache_dir)
    if bench_bytes_s:
        return DiskReadEstimate(bench_bytes_s, "the profile's disk bench")
    return DiskReadEstimate(DEFAULT_DISK_READ_BYTES_S, "assumed: never measured here")


def _cached_bench_read(cache_dir: Path) -> float | None:
    """The disk figure of the last `volunteer profile`, without measuring anything."""
    try:
        record = json.loads((cache_dir / BENCH_FILE).read_bytes())
        if record["format"] != BENCH_FORMAT:
            return None
        rate = record["results"]["disk_read_bytes_per_s"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if isinstance(rate, int | float) and math.isfinite(rate) and rate > 0:
        return float(rate)
    return None


def _device_of(cache_dir: Path) -> int:
    return os.stat(cache_dir).st_dev
