"""The offloading cost model against what a span streamed from disk really does.

Before a daemon announces an offloaded span it times a few decode steps of it. The cost
model (`scheduler.offload_cost.disk_tier_step_s`: reads of the next block overlap the
compute of this one, so the slower sets the pace) predicts those steps from the disk
read rate it would plan with (`volunteer.machine.calibration.disk_read_estimate`) and
from the compute the steps showed; the prediction and the measurement go in the span's
reason (`volunteer status`) and the log. The rate the reads really ran at is kept as the
disk's calibration, which the next plan of this machine starts from; on stop, the rate
over everything the span streamed replaces it.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from volunteer.errors import DiskFullError
from volunteer.machine.calibration import DiskReadEstimate, disk_read_estimate, save_calibration
from volunteer.machine.microbench import measure_decode_speed
from volunteer.models.model import BlockSpan
from volunteer.models.offload import OffloadedSpan, StreamStats
from volunteer.scheduler.offload_cost import disk_tier_step_s

logger = logging.getLogger(__name__)

CHECK_BUDGET_S = 0.2
"""Time for the timed steps (at least two are run, the first a warm-up)."""
MIN_LIFETIME_READ_S = 1.0
"""Reading time below which a span's lifetime figure adds nothing to its first check."""


@dataclasses.dataclass(frozen=True)
class OffloadCheck:
    """Decode steps of an offloaded span: as the cost model predicted them, as timed."""

    predicted_tps: float
    measured_tps: float
    planned_read: DiskReadEstimate
    """The read rate the prediction used."""
    read_bytes_s: float
    """The rate the reads ran at (kept as the disk's calibration)."""

    @property
    def measured_over_predicted(self) -> float:
        return self.measured_tps / self.predicted_tps

    def describe(self) -> str:
        planned = self.planned_read
        return (
            f"the cost model predicted {self.predicted_tps:.2f} tokens/s with reads at "
            f"{planned.bytes_s / 1e6:.0f} MB/s ({planned.origin}); measured "
            f"{self.measured_tps:.2f} tokens/s with reads at {self.read_bytes_s / 1e6:.0f} MB/s"
        )


def check_offloaded_span(
    span: OffloadedSpan, threads: int, cache_dir: Path, source: str
) -> OffloadCheck | None:
    """Times decode steps of `span` on `threads` torch threads against the cost model's
    prediction, and keeps the read rate they showed as the calibration of the disk under
    `cache_dir` (`source` says what streamed). None if the steps read nothing. Blocks:
    call it off the event loop, on a thread that may set torch's thread count."""
    planned = disk_read_estimate(cache_dir)
    before = span.stream_stats
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        per_block_tps = measure_decode_speed(span, CHECK_BUDGET_S)
    finally:
        torch.set_num_threads(previous_threads)
    read = _difference(span.stream_stats, before)
    steps = read.blocks_read / span.num_blocks
    if steps <= 0 or read.read_s <= 0 or read.bytes_read <= 0:
        return None
    step_s = span.num_blocks / per_block_tps
    # What the compute thread did besides waiting for reads: the step's compute.
    compute_s = max(step_s - read.wait_s / steps, 0.0)
    predicted_s = disk_tier_step_s(int(read.bytes_read / steps), planned.bytes_s, compute_s)
    check = OffloadCheck(
        predicted_tps=1 / predicted_s,
        measured_tps=1 / step_s,
        planned_read=planned,
        read_bytes_s=read.read_bytes_per_s,
    )
    _keep(cache_dir, check.read_bytes_s, source)
    logger.info("offloaded %s: %s", source, check.describe())
    return check


def keep_lifetime_calibration(
    span: BlockSpan, cache_dir: Path, *, min_read_s: float = MIN_LIFETIME_READ_S
) -> None:
    """On stop: the read rate over all an offloaded span streamed becomes the disk's
    calibration (once it read long enough to say more than its first check)."""
    if not isinstance(span, OffloadedSpan):
        return
    stats = span.stream_stats
    if stats.read_s < min_read_s:
        return
    _keep(cache_dir, stats.read_bytes_per_s, f"blocks {span.start}:{span.end} while serving")


def _keep(cache_dir: Path, read_bytes_s: float, source: str) -> None:
    try:
        save_calibration(cache_dir, read_bytes_s, source)
    except (OSError, DiskFullError) as exc:  # the last calibration stands
        logger.warning("could not keep the disk calibration: %s", exc)


def _difference(after: StreamStats, before: StreamStats) -> StreamStats:
    return StreamStats(
        blocks_read=after.blocks_read - before.blocks_read,
        bytes_read=after.bytes_read - before.bytes_read,
        read_s=after.read_s - before.read_s,
        wait_s=after.wait_s - before.wait_s,
    )
