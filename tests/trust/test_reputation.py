"""Each peer's record of checks and bans: kept in a real SQLite file across restarts,
bans growing and ending on time, a bad file refused with a clear error."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
from volunteer.scheduler.verification import FIRST_BAN_S, ban_s

from volunteer.trust.reputation import Reputation, ReputationStoreError


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_checks_and_bans_survive_a_restart(tmp_path: Path) -> None:
    path, clock = tmp_path / "data" / "reputation.sqlite3", Clock()
    reputation = Reputation(path, clock=clock)
    for _ in range(3):
        reputation.record_check("honest", passed=True)
    reputation.record_check("cheat", passed=False)
    reputation.ban("cheat", "perturbed output at position 7 of blocks 15:30")
    reputation.close()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    again = Reputation(path, clock=clock)
    assert again.of("honest").passed == 3
    cheat = again.of("cheat")
    assert (cheat.failed, cheat.bans) == (1, 1)
    assert cheat.ban_reason.startswith("perturbed output")
    assert again.banned() == {"cheat"}
    assert again.of("stranger").passed == 0  # never checked: a fresh record
    assert {p.peer_id for p in again} == {"honest", "cheat"}
    again.close()


def test_a_ban_ends_on_time_and_the_next_one_is_longer() -> None:
    clock = Clock()
    reputation = Reputation(clock=clock)
    first = reputation.ban("cheat", "wrong").banned_until_s - clock.now
    assert first == FIRST_BAN_S
    clock.now += first + 1
    assert not reputation.is_banned("cheat") and reputation.banned() == frozenset()
    second = reputation.ban("cheat", "wrong again").banned_until_s - clock.now
    assert second == ban_s(1) > first
    assert reputation.is_banned("cheat")


def test_a_file_that_is_not_sqlite_is_refused_clearly(tmp_path: Path) -> None:
    path = tmp_path / "reputation.sqlite3"
    path.write_bytes(b"not a database at all, just bytes" * 100)
    with pytest.raises(ReputationStoreError, match="cannot open the reputation file"):
        Reputation(path)
