"""`PeerMeasurements`: what a sample counts for, and how many peers it keeps.

The timing of real calls to real servers is tested in `test_claims_checked`; here samples
go in directly, so each rule can be checked to the float."""

from __future__ import annotations

import pytest

from volunteer.client.measurements import (
    EWMA_WEIGHT,
    MIN_BLOCK_S,
    MIN_COMPUTE_SHARE,
    PeerMeasurements,
)


def _measurements(max_peers: int = 16) -> PeerMeasurements:
    return PeerMeasurements(clock=lambda: 0.0, max_peers=max_peers)


def test_a_step_counts_its_time_less_the_round_trip_per_block() -> None:
    measured = _measurements()
    assert measured.decode_speed("a") is None and measured.rtt_s("a") is None
    measured.record_rtt("a", 0.02)
    measured.record_step("a", blocks=4, seconds=0.42, pushed=False)
    assert measured.decode_speed("a") == pytest.approx(1 / 0.1)
    # A pushed step was on its way before the client asked: nothing is subtracted.
    measured.record_step("a", blocks=4, seconds=0.42, pushed=True)
    expected = (1 - EWMA_WEIGHT) * 0.1 + EWMA_WEIGHT * 0.105
    assert measured.decode_speed("a") == pytest.approx(1 / expected)


def test_samples_are_averaged_so_a_server_that_slows_down_is_seen_to() -> None:
    measured = _measurements()
    measured.record_step("a", blocks=1, seconds=0.01, pushed=False)
    speeds = []
    for _ in range(10):
        measured.record_step("a", blocks=1, seconds=1.0, pushed=False)
        speeds.append(measured.decode_speed("a"))
    assert speeds == sorted(speeds, reverse=True)  # falls with every slow step
    assert speeds[-1] == pytest.approx(1.0, rel=0.05)


def test_a_forward_counts_per_block_and_token_apart_from_decode_steps() -> None:
    measured = _measurements()
    measured.record_rtt("a", 0.1)
    measured.record_forward("a", blocks=2, tokens=50, seconds=1.1)
    assert measured.forward_speed("a") == pytest.approx(100.0)
    assert measured.decode_speed("a") is None


def test_at_least_half_a_call_counts_as_compute_however_long_the_round_trip() -> None:
    measured = _measurements()
    measured.record_rtt("a", 1.0)  # a server answering pings slowly, to look fast
    measured.record_step("a", blocks=1, seconds=0.5, pushed=False)
    assert measured.decode_speed("a") == pytest.approx(1 / (MIN_COMPUTE_SHARE * 0.5))
    measured.record_forward("b", blocks=1, tokens=1, seconds=0.0)  # a coarse clock
    assert measured.forward_speed("b") == 1 / MIN_BLOCK_S


def test_the_table_keeps_the_most_recently_measured_peers() -> None:
    measured = _measurements(max_peers=3)
    for peer in ("a", "b", "c"):
        measured.record_rtt(peer, 0.01)
    measured.record_step("a", blocks=1, seconds=0.1, pushed=False)  # "a" is recent again
    measured.record_rtt("d", 0.01)
    assert measured.rtt_s("b") is None  # the least recently measured went
    assert all(measured.rtt_s(peer) is not None for peer in ("a", "c", "d"))


def test_the_least_round_trip_seen_counts() -> None:
    measured = _measurements()
    measured.record_rtt("a", 0.05)  # the first ping also set up the connection
    measured.record_rtt("a", 0.002)
    measured.record_rtt("a", 0.004)
    assert measured.rtt_s("a") == 0.002
