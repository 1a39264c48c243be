"""The check share and ban policy (BOINC's adaptive replication, growing bans)."""

from __future__ import annotations

import itertools
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
    standing,
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
