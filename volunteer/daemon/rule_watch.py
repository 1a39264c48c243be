"""Applies the owner's rules (`volunteer.scheduler.owner_rules`) to a serving daemon.

Every RULE_PERIOD_S it reads the machine (`volunteer.machine.owner_sensors`), asks the
rules, and pauses or resumes through the same path as the volunteer's pause (the
control API's `pause`: OFFLINE in the swarm once any blocks only it held are handed over;
open sessions finish), saying which rule did it. A pause by the volunteer is theirs: the
rules never end it. A resume by the volunteer while a rule holds wins until that rule
lets go.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from volunteer.machine.owner_sensors import OwnerSensors
from volunteer.scheduler.owner_rules import OwnerRules, Verdict, decide, parse_schedule
from volunteer.settings import Settings

if TYPE_CHECKING:
    from volunteer.daemon.serving_control import ServingControl

logger = logging.getLogger(__name__)

RULE_PERIOD_S = 2.0
"""Between two looks at the machine: a pause comes within about this of its cause."""
CALM_LOOKS_TO_RESUME = 3
"""Looks in a row at which no rule holds before a rule's pause ends: a load hovering at
a limit must not flip the server OFFLINE and ONLINE at every look."""
BY_YOU = "you"


def rules_of(settings: Settings) -> OwnerRules:
    return OwnerRules(
        run_on_battery=settings.run_on_battery,
        pause_while_user_active=settings.pause_while_user_active,
        user_idle_minutes=settings.user_idle_minutes,
        pause_when_other_cpu_percent=settings.pause_when_other_cpu_percent,
        schedule=parse_schedule(settings.schedule),
        max_ram_percent_in_use=settings.max_ram_percent_in_use,
        max_ram_percent_idle=settings.max_ram_percent_idle,
    )


class RuleWatch:
    """The owner's rules over one `ServingControl` (see the module docstring)."""

    def __init__(self, control: ServingControl, sensors: OwnerSensors) -> None:
        self.control = control
        self.sensors = sensors
        self.verdict: Verdict | None = None
        """The last look's (None: none yet)."""
        self.overridden_rule: str | None = None
        """The rule the volunteer resumed against: it pauses nothing until it lets go."""
        self.calm_looks = 0

    def describe(self) -> str | None:
        """For `status`: what the rules say now, and where user activity comes from."""
        if self.verdict is None:
            return None
        overridden = " (overridden by your resume)" if self.overridden_rule else ""
        return f"{self.verdict.reason}{overridden}; user activity: {self.sensors.idle_source}"

    def override(self) -> None:
        """The volunteer resumes: the rule that holds now (if one does) waits until it
        lets go; another rule still pauses."""
        if self.verdict is not None and self.verdict.pause:
            self.overridden_rule = self.verdict.rule

    async def run(self) -> None:
        while True:
            try:
                await self.check()
            except Exception:  # a sensor gone wrong must not end the daemon's service
                logger.exception("the owner's rules could not be checked")
            await asyncio.sleep(RULE_PERIOD_S)

    async def check(self) -> None:
        control = self.control
        rules = rules_of(control.settings)
        readings = await asyncio.to_thread(self.sensors.read, rules)
        verdict = decide(rules, readings)
        self.verdict = verdict
        if verdict.rule != self.overridden_rule:
            self.overridden_rule = None  # it let go, or another rule comes first now
        self.calm_looks = 0 if verdict.pause else self.calm_looks + 1
        if not control.is_serving or control.paused_by == BY_YOU or control.is_pausing:
            return
        if verdict.pause and verdict.rule != self.overridden_rule:
            if control.paused_by is not None:
                control.paused_by = verdict.reason  # still paused: by the rule as it reads now
            elif not control.is_paused:
                logger.info("pausing: %s", verdict.reason)
                await control.set_paused(True, by=verdict.reason)
        elif control.paused_by is not None and self.calm_looks >= CALM_LOOKS_TO_RESUME:
            logger.info("resuming: the rules let it work (%s)", verdict.reason)
            await control.set_paused(False, by=None)
