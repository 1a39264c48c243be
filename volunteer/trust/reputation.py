"""What this peer knows of others from its own checks: passed and failed checks, bans.

A ban is this peer's own decision, from a check it ran (or, later, an accusation it
verified): it lasts `scheduler.verification.ban_s` and grows with each ban of the same
peer. In memory by default; with a path, kept in a SQLite file (0600) so that a restart
forgets neither a cheat nor a server's earned record.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from volunteer.errors import VolunteerError
from volunteer.scheduler.verification import CheckRecord, ban_s
from volunteer.trust.sqlite_file import open_private_db

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS peers (peer_id TEXT PRIMARY KEY, passed INTEGER NOT NULL,"
    " failed INTEGER NOT NULL, bans INTEGER NOT NULL, first_seen_s REAL NOT NULL,"
    " banned_until_s REAL NOT NULL, ban_reason TEXT NOT NULL)"
)
MAX_REASON_CHARS = 500


class ReputationStoreError(VolunteerError):
    """The reputation file cannot be opened, read or written."""


@dataclasses.dataclass
class PeerStanding:
    """One peer's record here (wall-clock seconds: it outlives the process)."""

    peer_id: str
    passed: int = 0
    failed: int = 0
    bans: int = 0
    first_seen_s: float = 0.0
    banned_until_s: float = 0.0
    ban_reason: str = ""

    @property
    def record(self) -> CheckRecord:
        return CheckRecord(passed=self.passed, failed=self.failed, bans=self.bans)

    def is_banned(self, now_s: float) -> bool:
        return self.banned_until_s > now_s


class Reputation:
    """Every checked peer's standing (see the module's docstring). Not thread-safe: one
    event loop owns it."""

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time):
        self.clock = clock
        self._peers: dict[str, PeerStanding] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = _open(path)
            for row in self._db.execute("SELECT * FROM peers"):
                self._peers[row[0]] = PeerStanding(*row)

    def of(self, peer_id: str) -> PeerStanding:
        """The peer's standing (a fresh one, not stored, for a peer never checked)."""
        return self._peers.get(peer_id) or PeerStanding(peer_id, first_seen_s=self.clock())

    def __iter__(self) -> Iterator[PeerStanding]:
        return iter(list(self._peers.values()))

    def record_check(self, peer_id: str, *, passed: bool) -> PeerStanding:
        standing = self._stored(peer_id)
        if passed:
            standing.passed += 1
        else:
            standing.failed += 1
        self._save(standing)
        return standing

    def ban(self, peer_id: str, reason: str) -> PeerStanding:
        """Bans the peer from now on (longer than its last ban), for `reason`."""
        standing = self._stored(peer_id)
        now = self.clock()
        standing.banned_until_s = max(standing.banned_until_s, now + ban_s(standing.bans))
        standing.bans += 1
        standing.ban_reason = reason[:MAX_REASON_CHARS]
        self._save(standing)
        return standing

    def is_banned(self, peer_id: str) -> bool:
        standing = self._peers.get(peer_id)
        return standing is not None and standing.is_banned(self.clock())

    def banned(self) -> frozenset[str]:
        """Peers banned now."""
        now = self.clock()
        return frozenset(p.peer_id for p in self._peers.values() if p.is_banned(now))

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _stored(self, peer_id: str) -> PeerStanding:
        if peer_id not in self._peers:
            self._peers[peer_id] = PeerStanding(peer_id, first_seen_s=self.clock())
        return self._peers[peer_id]

    def _save(self, standing: PeerStanding) -> None:
        if self._db is None:
            return
        try:
            with self._db:
                self._db.execute(
                    "INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?, ?, ?)",
                    dataclasses.astuple(standing),
                )
        except sqlite3.Error as exc:
            raise ReputationStoreError(f"cannot write the reputation file: {exc}") from exc


def _open(path: Path) -> sqlite3.Connection:
    return open_private_db(path, _SCHEMA, ReputationStoreError, "reputation file")
