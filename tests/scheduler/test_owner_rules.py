"""The owner's rules, decided from readings given in full: the schedule's windows (across
midnight too), battery, user activity, other programs' CPU, the daemon's RAM; what could
not be measured never pauses, and is said."""

from __future__ import annotations

import datetime as dt

import pytest
from volunteer.scheduler.owner_rules import (
    OwnerRules,
    Readings,
    RuleError,
    Window,
    decide,
    parse_schedule,
)

NOON = dt.datetime(2026, 12, 7, 12, 0)


def _readings(**changes) -> Readings:
    fields = {"now": NOON, "on_battery": False, "idle_s": 3600.0, "other_cpu_percent": 5.0}
    return Readings(**{**fields, **changes})


def test_a_schedule_reads_windows_and_normalises_them() -> None:
    assert parse_schedule("") == ()
    assert parse_schedule(" 22:00 - 07:00 ,12:00-13:30") == (Window(1320, 420), Window(720, 810))
    assert str(parse_schedule("9:05-17:00")[0]) == "09:05-17:00"
    assert parse_schedule("18:00-24:00") == (Window(1080, 0),)


@pytest.mark.parametrize(
    "text", ["22-07", "22:00-07", "25:00-07:00", "10:60-11:00", "x", "10:00-10:00", "12:00-24:30"]
)
def test_a_schedule_that_is_not_one_is_refused(text: str) -> None:
    with pytest.raises(RuleError):
        parse_schedule(text)


@pytest.mark.parametrize(
    ("hour", "minute", "pause"),
    [
        (21, 59, True),
        (22, 0, False),
        (23, 59, False),
        (0, 0, False),
        (6, 59, False),
        (7, 0, True),
        (12, 0, True),
    ],
)
def test_a_window_past_midnight_holds_the_night(hour: int, minute: int, pause: bool) -> None:
    rules = OwnerRules(schedule=parse_schedule("22:00-07:00"))
    verdict = decide(rules, _readings(now=NOON.replace(hour=hour, minute=minute)))
    assert verdict.pause is pause
    if pause:
        assert verdict.reason == "outside the schedule (22:00-07:00)"


def test_no_schedule_means_any_time() -> None:
    assert not decide(OwnerRules(), _readings(now=NOON.replace(hour=3))).pause


@pytest.mark.parametrize(("on_battery", "pause"), [(True, True), (False, False), (None, False)])
def test_battery_pauses_unless_allowed(on_battery: bool | None, pause: bool) -> None:
    assert decide(OwnerRules(), _readings(on_battery=on_battery)).pause is pause
    assert not decide(OwnerRules(run_on_battery=True), _readings(on_battery=True)).pause


def test_an_active_user_pauses_only_when_the_rule_is_on() -> None:
    rules = OwnerRules(pause_while_user_active=True, user_idle_minutes=3)
    active = decide(rules, _readings(idle_s=60.0))
    assert active.pause and active.reason == "the user is active (input 1.0 min ago, under 3)"
    assert not decide(rules, _readings(idle_s=180.0)).pause  # 3 minutes: away
    assert not decide(OwnerRules(), _readings(idle_s=0.0)).pause


def test_unknown_user_activity_never_pauses_and_says_so() -> None:
    rules = OwnerRules(pause_while_user_active=True)
    verdict = decide(rules, _readings(idle_s=None))
    assert not verdict.pause
    assert "user activity unknown here" in verdict.reason


def test_other_programs_cpu_over_the_limit_pauses() -> None:
    rules = OwnerRules(pause_when_other_cpu_percent=25)
    busy = decide(rules, _readings(other_cpu_percent=60.0))
    assert busy.pause and busy.reason == "other programs use 60% of the CPU (over 25%)"
    assert not decide(rules, _readings(other_cpu_percent=25.0)).pause
    unknown = decide(rules, _readings(other_cpu_percent=None))
    assert not unknown.pause and "CPU use unknown" in unknown.reason
    assert not decide(OwnerRules(), _readings(other_cpu_percent=100.0)).pause  # rule off


@pytest.mark.parametrize(
    ("in_use", "idle", "idle_s", "cap"),
    [
        (50, 90, 10.0, 50),  # in use: the in-use cap
        (50, 90, 3600.0, 90),  # away: the idle cap
        (50, 90, None, 50),  # unknown: the stricter, not a guess
        (None, 90, 10.0, 90),  # no in-use cap: the idle one holds in use too
        (50, None, 3600.0, None),  # no idle cap: none while away
        (None, None, 10.0, None),
    ],
)
def test_the_ram_cap_follows_whether_the_machine_is_in_use(
    in_use: float | None, idle: float | None, idle_s: float | None, cap: float | None
) -> None:
    rules = OwnerRules(max_ram_percent_in_use=in_use, max_ram_percent_idle=idle)
    for held, pauses in (
        (45.0, False),
        (70.0, cap is not None and cap < 70),
        (95.0, cap is not None),
    ):
        verdict = decide(rules, _readings(idle_s=idle_s, own_ram_percent=held))
        assert verdict.pause is pauses, (held, verdict)
        if pauses:
            assert verdict.rule == "ram"
            assert f"holds {held:.0f}% of the RAM, over the {cap:g}% allowed" in verdict.reason
    assert not decide(rules, _readings(idle_s=idle_s, own_ram_percent=None)).pause


def test_ram_caps_that_differ_need_user_activity_and_say_when_it_is_unknown() -> None:
    assert OwnerRules(max_ram_percent_in_use=50, max_ram_percent_idle=90).needs_activity
    assert OwnerRules(max_ram_percent_in_use=50).needs_activity  # none while away
    assert not OwnerRules(max_ram_percent_idle=50).needs_activity  # one cap at all times
    assert not OwnerRules(max_ram_percent_in_use=60, max_ram_percent_idle=60).needs_activity
    rules = OwnerRules(max_ram_percent_in_use=50, max_ram_percent_idle=90)
    verdict = decide(rules, _readings(idle_s=None, own_ram_percent=10.0))
    assert "the in-use RAM cap applies" in verdict.reason


def test_the_first_rule_that_holds_is_the_reason() -> None:
    rules = OwnerRules(
        schedule=parse_schedule("22:00-07:00"),
        pause_while_user_active=True,
        pause_when_other_cpu_percent=10,
    )
    everything = _readings(on_battery=True, idle_s=0.0, other_cpu_percent=90.0)
    assert decide(rules, everything).reason.startswith("outside the schedule")
    night = dt.datetime(2026, 12, 7, 23, 0)
    assert decide(rules, _readings(now=night, on_battery=True)).reason.startswith("on battery")
    working = decide(rules, _readings(now=night))
    assert not working.pause and working.reason == "no rule pauses it"
