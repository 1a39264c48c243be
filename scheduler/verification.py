"""How often to check a server's work, and how long a proven cheat stays banned.

As BOINC's adaptive replication: a newcomer has all its work checked; the share falls as
its record of passed checks (one per step or call) grows (half after `HALF_AT` passes,
never under `MIN_SHARE`), and any failure puts it back to all. What the share is drawn
for is the caller's: a client draws once per hop of a session, whose every step is then
checked (`volunteer.client.verification`), and once per forward/backward call.

A ban lasts `FIRST_BAN_S`, and `BAN_GROWTH` times longer at each next ban of the same
peer, `MAX_BAN_S` at most: an honest peer wrongly banned (it cannot be by the checks'
tolerance, but a bug can) comes back, a repeated cheat stays out longer each time.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

Mode = Literal["off", "sample", "all"]
MODES: tuple[Mode, ...] = ("off", "sample", "all")
HALF_AT = 10
"""Passed checks after which half of a server's work is checked."""
MIN_SHARE = 0.05
"""The least share of work checked, however long the record."""
FIRST_BAN_S = 600.0
BAN_GROWTH = 4.0
MAX_BAN_S = 7 * 24 * 3600.0


@dataclasses.dataclass(frozen=True)
class CheckRecord:
    """What one peer knows of another from its own checks."""

    passed: int = 0
    failed: int = 0
    bans: int = 0
    """Bans so far, the current one included."""


def check_share(record: CheckRecord, mode: Mode) -> float:
    """The share of a server's work to check (0 to 1)."""
    if mode == "off":
        return 0.0
    if mode == "all" or record.failed > 0:
        return 1.0
    return max(MIN_SHARE, 1.0 / (1.0 + record.passed / HALF_AT))


def is_checked_now(record: CheckRecord, mode: Mode, draw: float) -> bool:
    """Whether this step is checked, `draw` being uniform in [0, 1) from the caller's rng."""
    return draw < check_share(record, mode)


def ban_s(bans_before: int) -> float:
    """How long a new ban lasts for a peer banned `bans_before` times already."""
    return min(MAX_BAN_S, FIRST_BAN_S * BAN_GROWTH**bans_before)


def standing(record: CheckRecord) -> float:
    """A score from 0 (failed checks only) to 1 (many passed, none failed), routing's
    preference among servers of like speed: a newcomer scores 0.5."""
    return (record.passed + HALF_AT) / (record.passed + 2 * HALF_AT + 10 * record.failed)


IDLE_VALIDATOR_FACTOR = 5.0
"""How much more of its time a daemon serving no blocks spends validating (its
capacity is spare), within `MAX_VALIDATOR_SHARE`."""
MAX_VALIDATOR_SHARE = 0.5


def validator_share(configured: float, *, is_serving: bool) -> float:
    """The share of its time a daemon spends checking others: the volunteer's setting
    (0 turns the role off), more while the daemon serves nothing."""
    if configured <= 0.0 or is_serving:
        return max(0.0, configured)
    return min(MAX_VALIDATOR_SHARE, max(configured, configured * IDLE_VALIDATOR_FACTOR))


def validator_rest_s(round_s: float, share: float, *, min_rest_s: float) -> float:
    """How long a validator rests after a round of checks that took `round_s`, so that
    checking takes at most `share` of its time (never: a share of 0)."""
    if share <= 0.0:
        return math.inf
    return max(min_rest_s, round_s * (1.0 - share) / share)


def probe_order(records: dict[str, CheckRecord], draws: dict[str, float]) -> list[str]:
    """Which servers a validator checks first: the least checked (newcomers on
    probation), ties broken by the caller's random `draws`."""
    return sorted(records, key=lambda peer: (records[peer].passed, draws.get(peer, 0.0)))
