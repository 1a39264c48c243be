"""The leaderboard as this peer audited it: each server's last summary that held up.

`volunteer.daemon.credit_service` puts a summary here only once it passed an audit
(`volunteer.trust.credit_audit`); a summary that fails leaves the server's last audited
one (if any) in place and is remembered as failed. Every round of looks also counts who
had a live summary: a server's uptime share is the share of this peer's looks, since it
first saw it, at which it was there.

Kept in a SQLite file (0600) so that the board survives restarts; in memory without one.
"""

from __future__ import annotations

import dataclasses
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import msgpack

from volunteer.errors import VolunteerError
from volunteer.trust.credit_summary import Summary
from volunteer.trust.sqlite_file import open_private_db

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS board (peer_id TEXT PRIMARY KEY, summary BLOB,"
    " audited_s REAL NOT NULL, looks INTEGER NOT NULL, seen INTEGER NOT NULL,"
    " failure TEXT NOT NULL, failed_root BLOB NOT NULL)"
)
_ROW = ", ".join("?" * 7)
MAX_FAILURE_CHARS = 300


class BoardStoreError(VolunteerError):
    """The board file cannot be opened, read or written."""


@dataclasses.dataclass
class Entry:
    peer_id: str
    summary: Summary | None = None
    """The last summary that passed an audit (None: none yet)."""
    audited_s: float = 0.0
    looks: int = 0
    seen: int = 0
    failure: str = ""
    """Why the server's latest summary was dropped ("" : it held up)."""
    failed_root: bytes = b""
    """The root of that summary (it is not audited again)."""

    @property
    def uptime_share(self) -> float:
        return self.seen / self.looks if self.looks else 0.0


class Board:
    """Audited summaries by peer id (see the module). One event loop owns it."""

    def __init__(self, path: Path | None = None) -> None:
        self._entries: dict[str, Entry] = {}
        self._db: sqlite3.Connection | None = None
        if path is not None:
            self._db = open_private_db(path, _SCHEMA, BoardStoreError, "board file")
            for peer_id, raw, *rest in self._db.execute("SELECT * FROM board"):
                summary = None
                if raw is not None:
                    summary = Summary.model_validate(msgpack.unpackb(raw, raw=False))
                self._entries[peer_id] = Entry(peer_id, summary, *rest)

    def __iter__(self) -> Iterator[Entry]:
        return iter(list(self._entries.values()))

    def get(self, peer_id: str) -> Entry | None:
        return self._entries.get(peer_id)

    def look(self, live: set[str]) -> None:
        """One round of looks: who of the known servers (and which new ones) is live."""
        for peer_id in live:
            self._entries.setdefault(peer_id, Entry(peer_id))
        for entry in self._entries.values():
            entry.looks += 1
            entry.seen += entry.peer_id in live
        self._save(*self._entries.values())

    def audited(self, peer_id: str, summary: Summary, now_s: float) -> None:
        entry = self._entries.setdefault(peer_id, Entry(peer_id))
        entry.summary, entry.audited_s = summary, now_s
        entry.failure, entry.failed_root = "", b""
        self._save(entry)

    def failed(self, peer_id: str, reason: str, root: bytes) -> None:
        entry = self._entries.setdefault(peer_id, Entry(peer_id))
        entry.failure, entry.failed_root = reason[:MAX_FAILURE_CHARS], root
        self._save(entry)

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _save(self, *entries: Entry) -> None:
        if self._db is None:
            return
        rows = [
            (
                e.peer_id,
                None if e.summary is None else msgpack.packb(e.summary.model_dump()),
                e.audited_s,
                e.looks,
                e.seen,
                e.failure,
                e.failed_root,
            )
            for e in entries
        ]
        try:
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO board VALUES (?, ?, ?, ?, ?, ?, ?)", rows
                )
        except sqlite3.Error as exc:
            raise BoardStoreError(f"cannot write the board file: {exc}") from exc
