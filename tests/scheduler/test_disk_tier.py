"""The cost model of the disk tier: reads overlap compute, the slower one sets the pace."""

from __future__ import annotations

import pytest
from volunteer.scheduler.offload_cost import calibrated_read_bytes_s, disk_tier_step_s


def test_the_slower_of_reading_and_computing_sets_the_pace() -> None:
    assert disk_tier_step_s(400e6, 2e9, 0.05) == pytest.approx(0.2)  # read-bound
    assert disk_tier_step_s(40e6, 2e9, 0.05) == pytest.approx(0.05)  # compute-bound


def test_calibration_finds_the_bandwidth_a_read_bound_step_showed() -> None:
    measured = disk_tier_step_s(400e6, 1.6e9, 0.05)
    assert calibrated_read_bytes_s(400e6, measured) == pytest.approx(1.6e9)
    # Compute-bound: only a lower bound on the disk.
    assert calibrated_read_bytes_s(40e6, disk_tier_step_s(40e6, 2e9, 0.05)) < 2e9
