"""The check share and ban policy (BOINC's adaptive replication, growing bans)."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from volunteer.scheduler.verification import (
    FIRST_BAN_S,
    MAX_BAN_S,
    MIN_SHARE,
    CheckRecord,
    ban_s,
    check_share,
    is_checked_now,
    probe_order,
    standing,
    validator_rest_s,
    validator_share,
)


def test_a_newcomer_is_checked_on_every_step_and_a_proven_server_on_few() -> None:
    assert check_share(CheckRecord(), "sample") == 1.0
    shares = [check_share(CheckRecord(passed=n), "sample") for n in (0, 10, 90, 10_000)]
    assert shares == sorted(shares, reverse=True)
    assert shares[1] == pytest.approx(0.5)
    assert shares[-1] == MIN_SHARE


def test_any_failure_brings_back_every_step_and_the_modes_bound_the_share() -> None:
    assert check_share(CheckRecord(passed=10_000, failed=1), "sample") == 1.0
    assert check_share(CheckRecord(passed=10_000), "all") == 1.0
    assert check_share(CheckRecord(), "off") == 0.0


def test_the_sampled_share_is_what_the_draws_give() -> None:
    rng = random.Random(0)
    record = CheckRecord(passed=10)
    checked = sum(is_checked_now(record, "sample", rng.random()) for _ in range(4000))
    assert 1800 < checked < 2200


def test_bans_grow_and_are_bounded() -> None:
    lengths = [ban_s(n) for n in range(12)]
    assert lengths[0] == FIRST_BAN_S
    assert all(a < b for a, b in itertools.pairwise(lengths[:5]))
    assert lengths[-1] == MAX_BAN_S


def test_standing_prefers_passed_checks_and_sinks_with_a_failure() -> None:
    assert standing(CheckRecord()) == pytest.approx(0.5)
    assert standing(CheckRecord(passed=100)) > 0.9
    assert standing(CheckRecord(passed=100, failed=1)) < standing(CheckRecord(passed=100))
    assert standing(CheckRecord(failed=3)) < 0.3


def test_a_validator_rests_to_keep_within_its_share() -> None:
    assert validator_rest_s(1.0, 0.5, min_rest_s=0.1) == pytest.approx(1.0)
    assert validator_rest_s(1.0, 0.02, min_rest_s=5.0) == pytest.approx(49.0)
    assert validator_rest_s(0.01, 0.5, min_rest_s=5.0) == 5.0
    assert validator_rest_s(1.0, 0.0, min_rest_s=5.0) == math.inf
    # Time checking over time in all stays within the share, whatever a round costs.
    for round_s in (0.1, 2.0, 30.0):
        rest = validator_rest_s(round_s, 0.1, min_rest_s=1.0)
        assert round_s / (round_s + rest) <= 0.1 + 1e-9


def test_a_validator_checks_the_least_checked_first() -> None:
    records = {"old": CheckRecord(passed=40), "new": CheckRecord(), "mid": CheckRecord(passed=3)}
    assert probe_order(records, {}) == ["new", "mid", "old"]
    tied = {"a": CheckRecord(), "b": CheckRecord()}
    assert probe_order(tied, {"a": 0.9, "b": 0.1}) == ["b", "a"]
    assert probe_order(tied, {"a": 0.1, "b": 0.9}) == ["a", "b"]


def test_a_daemon_serving_nothing_validates_more_within_bounds() -> None:
    assert validator_share(0.02, is_serving=True) == 0.02
    assert validator_share(0.02, is_serving=False) == pytest.approx(0.1)
    assert validator_share(0.3, is_serving=False) == 0.5
    assert validator_share(0.0, is_serving=False) == 0.0  # off stays off
