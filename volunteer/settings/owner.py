"""`OwnerRules`' settings: when, and how much of the machine, the daemon may use, a base of
`Settings` (declared as its other fields are: `volunteer.settings.spec`). All apply live;
`volunteer.daemon.rule_watch` applies the pausing ones, the server the caps."""

from __future__ import annotations

import dataclasses
import os

from volunteer.settings import spec as s
from volunteer.settings.spec import OnScreen, setting

RULES_HEADING = "When the owner needs the machine"


@dataclasses.dataclass(frozen=True, kw_only=True)
class OwnerRuleSettings:
    """BOINC's computing preferences: caps on CPU, memory and upload, and when to pause."""

    max_cpu_percent: float = setting(
        default=100.0,
        parse=s.percent(low=5),
        help="most of the machine's CPU the daemon may use, in %% of all cores (100)",
        metavar="PERCENT",
        label="CPU limit",
        screen=OnScreen("Most CPU to use (% of all cores)", "100", heading=RULES_HEADING),
        is_live=True,
    )
    """As BOINC does: fewer threads (a share of the cores), then a duty cycle (the compute
    thread rests in proportion to its work) for what is left: 50 on 8 cores is 4 threads
    working all the time; 30 on 2 cores is 1 thread working 60% of the time."""
    run_on_battery: bool = setting(
        default=False,
        parse=s.parse_bool,
        help="keep working while the machine runs on battery (default: no, pause)",
        metavar="YES|NO",
        screen=OnScreen("Work on battery (yes/no)", "no"),
        is_live=True,
    )
    """Where no battery is found, the machine counts as plugged in."""
    pause_while_user_active: bool = setting(
        default=False,
        parse=s.parse_bool,
        help="pause while someone uses the machine (input in the last --user-idle-minutes)",
        metavar="YES|NO",
        label="pause while in use",
        screen=OnScreen("Pause while the machine is in use (yes/no)", "no"),
        is_live=True,
    )
    """Needs a source of user activity (logind's idle hint, X11, macOS, Windows); where
    there is none, `status` says so and this rule does nothing: it never guesses."""
    user_idle_minutes: float = setting(
        default=3.0,
        parse=s.seconds(0.5, 24 * 60, unit="minutes"),
        help="minutes without input after which the user counts as away (3)",
        metavar="MINUTES",
        label="idle minutes",
        screen=OnScreen("In use until input is this old (minutes)", "3"),
        is_live=True,
    )
    pause_when_other_cpu_percent: float | None = setting(
        default=None,
        parse=s.percent_or_off,
        help="pause while other programs use more than this %% of the CPU (default: off)",
        metavar="PERCENT",
        label="other programs' CPU limit",
        screen=OnScreen("Pause when other programs use over (% CPU)", "off"),
        is_live=True,
    )
    """Of all the machine's CPUs together; the daemon's own use (its children too) is not
    counted."""
    max_ram_percent_in_use: float | None = setting(
        default=None,
        parse=s.percent_or_off,
        help="most of the machine's RAM the daemon may use while the machine is in use, "
        "in %% (default: off; BOINC's is 50)",
        metavar="PERCENT",
        label="RAM limit in use",
        screen=OnScreen("Most RAM while in use (% of all)", "off"),
        is_live=True,
    )
    """Also the cap while user activity is unknown (the stricter of the two, not a guess).
    The blocks are planned within it at start (`volunteer.daemon.span_plan`); past it the
    daemon pauses, and the caches of its sessions are freed as they end."""
    max_ram_percent_idle: float | None = setting(
        default=None,
        parse=s.percent_or_off,
        help="most of the machine's RAM the daemon may use while nobody uses the machine, "
        "in %% (default: off; BOINC's is 90)",
        metavar="PERCENT",
        label="RAM limit idle",
        screen=OnScreen("Most RAM while idle (% of all)", "off"),
        is_live=True,
    )
    """Also the cap while in use where `max_ram_percent_in_use` is off."""
    schedule: str = setting(
        default="",
        parse=s.parse_schedule_setting,
        help='work only in these daily windows, e.g. "22:00-07:00" (default: any time)',
        metavar="WINDOWS",
        screen=OnScreen("Work only in these daily windows", "any time, e.g. 22:00-07:00"),
        is_live=True,
    )
    """Comma-separated HH:MM-HH:MM windows of local time; a window may cross midnight."""
    max_upload_mbps: float | None = setting(
        default=None,
        parse=s.mbps_or_off,
        help="most the served blocks may send to peers, in megabits per second (default: off)",
        metavar="MBPS",
        label="upload limit",
        screen=OnScreen("Most upload (Mbit/s)", "off"),
        is_live=True,
    )
    """The servers' replies and pushes through p2p, held to this average with a second's
    burst (`volunteer.transport.upload_limit`); this machine's own processes (local
    links) and the DHT's small records are not counted."""

    @property
    def cpu_cap_cores(self) -> float | None:
        """`max_cpu_percent` as cores the compute may keep busy on average (None: no cap);
        the compute thread rests where its threads would go beyond (a duty cycle)."""
        if self.max_cpu_percent >= 100:
            return None
        return (os.cpu_count() or 1) * self.max_cpu_percent / 100
