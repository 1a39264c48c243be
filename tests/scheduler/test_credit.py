"""The credit formula, its bounds (self-dealing, failed checks, bans, daily caps), escrow
and the recent average's one-week half-life."""

from __future__ import annotations

import pytest
from volunteer.scheduler.credit import (
    CLIENT_DAY_CAP,
    DAY_S,
    ESCROW_CHECKS,
    HALF_LIFE_S,
    MILLI,
    CheckTally,
    Work,
    check_tally,
    counted,
    decayed_milli,
    is_released,
    raw_milli,
    recent_average,
    standing_of,
)

PARAMS = 3_538_944  # one SmolLM2-135M block


def _work(n: int, client: str = "c", **changes: object) -> Work:
    fields = dict(receipt_id=f"{n:064x}", client=client, kind="inference", blocks=15, tokens=100)
    return Work(**{**fields, "closed_s": 1000.0 + n, **changes})  # type: ignore[arg-type]


def test_credit_is_blocks_times_tokens_times_model_size_and_backward_counts_double() -> None:
    one = raw_milli(blocks=1, tokens=1_000, kind="forward", params_per_block=1_000_000)
    assert one == 1_000  # 10^9 parameter-tokens: one credit
    assert (
        raw_milli(blocks=15, tokens=1_000, kind="forward", params_per_block=1_000_000) == 15 * one
    )
    assert raw_milli(blocks=1, tokens=1_000, kind="backward", params_per_block=1_000_000) == 2 * one
    assert (
        raw_milli(blocks=1, tokens=1_000, kind="inference", params_per_block=2_000_000) == 2 * one
    )
    assert raw_milli(blocks=1, tokens=1_000, kind="mining", params_per_block=1_000_000) == 0


def test_self_dealt_failed_and_banned_clients_earn_nothing() -> None:
    works = [_work(0), _work(1, client="server"), _work(2, failed=1, checked=1), _work(3, "bad")]
    found = counted(works, server="server", params_per_block=PARAMS, is_banned=lambda p: p == "bad")
    assert [each.milli > 0 for each in found] == [True, False, False, False]


def test_one_client_gives_at_most_the_daily_cap_and_a_new_day_starts_again() -> None:
    big = dict(tokens=10**7)  # far over the cap each
    works = [_work(n, **big) for n in range(3)] + [_work(9, closed_s=DAY_S * 5, **big)]
    works.append(_work(4, client="other", **big))
    found = {
        each.receipt_id: each.milli for each in counted(works, server="s", params_per_block=PARAMS)
    }
    cap = int(CLIENT_DAY_CAP * MILLI)
    assert [found[f"{n:064x}"] for n in range(3)] == [cap, 0, 0]
    assert found[f"{9:064x}"] == cap and found[f"{4:064x}"] == cap


def test_escrow_needs_checks_from_two_clients_and_few_failures() -> None:
    assert not is_released(CheckTally(passed=10 * ESCROW_CHECKS, failed=0, clients=1))
    assert not is_released(CheckTally(passed=ESCROW_CHECKS - 1, failed=0, clients=5))
    assert is_released(CheckTally(passed=ESCROW_CHECKS, failed=0, clients=2))
    assert not is_released(CheckTally(passed=ESCROW_CHECKS, failed=1, clients=2))
    works = [
        _work(0, checked=8),
        _work(1, client="d", checked=9, failed=1),
        _work(2, "s", checked=5),
    ]
    assert check_tally(works, server="s") == CheckTally(passed=16, failed=1, clients=2)


def test_held_credit_is_shown_held_and_forfeited_by_a_ban() -> None:
    assert standing_of(5_000, 5_000, released=False, banned=False).held == 5.0
    assert standing_of(5_000, 5_000, released=True, banned=True).total == 5.0
    lost = standing_of(5_000, 5_000, released=False, banned=True)
    assert lost.forfeited and lost.total == 0.0 and lost.held == 0.0


def test_recent_average_halves_in_a_week_and_equals_a_steady_daily_rate() -> None:
    clock = [0.0]  # an injected clock: seconds since the work
    milli = 1_000_000
    now = recent_average(decayed_milli(milli, 0.0, clock[0]))
    clock[0] += HALF_LIFE_S
    week_later = recent_average(decayed_milli(milli, 0.0, clock[0]))
    assert week_later == pytest.approx(now / 2, rel=1e-6)
    # 10 credits a day for a year: the recent average is 10 a day.
    steady = sum(decayed_milli(10 * MILLI, day * DAY_S, 365 * DAY_S) for day in range(365))
    assert recent_average(steady) == pytest.approx(10.0, rel=0.05)
    assert decayed_milli(milli, 100.0, 50.0) == milli  # a clock ahead counts as now
