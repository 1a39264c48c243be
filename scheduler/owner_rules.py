"""When the machine's owner wants it back: BOINC's computing preferences as one decision.

A volunteer lends what the machine can spare. Given what was just measured of the machine
(`Readings`) and the owner's rules (`OwnerRules`), `decide` says whether the daemon should
stop taking work now, and which rule says so, in words the owner reads in `volunteer
status`. What could not be measured (no battery sensor, no source of user activity) is
`None`, and a rule that needs it does not fire: it never guesses.

The daemon samples and applies this (`volunteer.daemon.rule_watch`); the clock and every
reading come in as arguments.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import re

_WINDOW = re.compile(r"^\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*$")


class RuleError(ValueError):
    """A rule that cannot be read (e.g. a schedule window like "25:00-07:00")."""


@dataclasses.dataclass(frozen=True)
class Window:
    """A daily time window [start, end), minutes after midnight; past midnight when
    end <= start ("22:00-07:00")."""

    start: int
    end: int

    def holds(self, minute: int) -> bool:
        if self.start < self.end:
            return self.start <= minute < self.end
        return minute >= self.start or minute < self.end

    def __str__(self) -> str:
        return (
            f"{self.start // 60:02d}:{self.start % 60:02d}-{self.end // 60:02d}:{self.end % 60:02d}"
        )


def parse_schedule(text: str) -> tuple[Window, ...]:
    """Daily windows from "22:00-07:00" or "12:00-13:30, 22:00-07:00"; "" for always.

    Raises:
        RuleError: a window that is not HH:MM-HH:MM of a real time, or an empty one.
    """
    windows = []
    for part in (p for p in text.split(",") if p.strip()):
        match = _WINDOW.match(part)
        if match is None:
            raise RuleError(f"{part.strip()!r} is not a window like 22:00-07:00")
        h1, m1, h2, m2 = (int(g) for g in match.groups())
        if h1 > 23 or h2 > 24 or m1 > 59 or m2 > 59 or (h2 == 24 and m2 != 0):
            raise RuleError(f"{part.strip()!r} holds a time that is not on a clock")
        window = Window(h1 * 60 + m1, (h2 * 60 + m2) % (24 * 60))
        if window.start == window.end:
            raise RuleError(f"{part.strip()!r} is empty: give a start and an end that differ")
        windows.append(window)
    return tuple(windows)


@dataclasses.dataclass(frozen=True)
class OwnerRules:
    """The owner's rules (the settings of the same names)."""

    run_on_battery: bool = False
    pause_while_user_active: bool = False
    user_idle_minutes: float = 3.0
    """The user counts as active until input has been this long ago."""
    pause_when_other_cpu_percent: float | None = None
    """Pause while the rest of the machine uses more than this share of all its CPUs."""
    schedule: tuple[Window, ...] = ()
    """Work only inside these daily windows; none: at any time."""
    max_ram_percent_in_use: float | None = None
    """The most of the machine's RAM the daemon may hold while the user is active."""
    max_ram_percent_idle: float | None = None
    """... while the user is away."""

    def ram_cap_percent(self, active: bool | None) -> float | None:
        """The RAM cap that applies (None: none): while the user is away, the idle one;
        while active, or while nobody knows (then the stricter: not a guess), the in-use
        one, or the idle one where that is off."""
        in_use, idle = self.max_ram_percent_in_use, self.max_ram_percent_idle
        if active is False:
            return idle
        return idle if in_use is None else in_use

    @property
    def needs_activity(self) -> bool:
        """Whether a rule depends on whether the user is active."""
        in_use = self.max_ram_percent_in_use
        return self.pause_while_user_active or in_use not in (None, self.max_ram_percent_idle)


@dataclasses.dataclass(frozen=True)
class Readings:
    """What the daemon just measured; None: could not be measured here."""

    now: dt.datetime
    """Local wall-clock time."""
    on_battery: bool | None
    idle_s: float | None
    """Seconds since the user's last input."""
    other_cpu_percent: float | None
    """CPU use of everything but the daemon, as a share of all the machine's CPUs."""
    own_ram_percent: float | None = None
    """RAM the daemon holds (its children too), as a share of the machine's."""


@dataclasses.dataclass(frozen=True)
class Verdict:
    pause: bool
    reason: str
    """Why it pauses; or, when it may work, what the rules could not see (for `status`)."""
    rule: str | None = None
    """Which rule pauses it ("schedule", "battery", "user_active", "other_cpu", "ram")."""


def is_user_active(rules: OwnerRules, readings: Readings) -> bool | None:
    if readings.idle_s is None:
        return None
    return readings.idle_s < rules.user_idle_minutes * 60


def decide(rules: OwnerRules, readings: Readings) -> Verdict:
    """Whether to stop taking work now, and why (the first rule that says so)."""
    if rules.schedule:
        minute = readings.now.hour * 60 + readings.now.minute
        if not any(window.holds(minute) for window in rules.schedule):
            windows = ", ".join(map(str, rules.schedule))
            return Verdict(True, f"outside the schedule ({windows})", "schedule")
    if not rules.run_on_battery and readings.on_battery:
        return Verdict(True, "on battery (run_on_battery is off)", "battery")
    active = is_user_active(rules, readings)
    if rules.pause_while_user_active and active:
        assert readings.idle_s is not None
        return Verdict(
            True,
            f"the user is active (input {readings.idle_s / 60:.1f} min ago, under "
            f"{rules.user_idle_minutes:g})",
            "user_active",
        )
    other = readings.other_cpu_percent
    limit = rules.pause_when_other_cpu_percent
    if limit is not None and other is not None and other > limit:
        return Verdict(
            True, f"other programs use {other:.0f}% of the CPU (over {limit:g}%)", "other_cpu"
        )
    ram, cap = readings.own_ram_percent, rules.ram_cap_percent(active)
    if cap is not None and ram is not None and ram > cap:
        state = {True: "in use", False: "idle", None: "maybe in use (unknown)"}[active]
        return Verdict(
            True,
            f"the daemon holds {ram:.0f}% of the RAM, over the {cap:g}% allowed while the "
            f"machine is {state}; its sessions' caches go as they end",
            "ram",
        )
    return Verdict(False, _unknowns(rules, readings))


def _unknowns(rules: OwnerRules, readings: Readings) -> str:
    """What the rules could not see, said plainly rather than guessed."""
    blind = []
    if rules.pause_while_user_active and readings.idle_s is None:
        blind.append("user activity unknown here: pause_while_user_active cannot act")
    if rules.needs_activity and not rules.pause_while_user_active and readings.idle_s is None:
        blind.append("user activity unknown here: the in-use RAM cap applies")
    if rules.pause_when_other_cpu_percent is not None and readings.other_cpu_percent is None:
        blind.append("other programs' CPU use unknown")
    return "; ".join(blind) or "no rule pauses it"
