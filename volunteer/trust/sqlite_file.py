"""A private SQLite file of this peer's trust records (reputation, receipts)."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from volunteer.errors import VolunteerError


def open_private_db(
    path: Path, schema: str, error: type[VolunteerError], what: str
) -> sqlite3.Connection:
    """The file at `path` (created 0600, its folder too), with `schema` applied.

    Raises:
        error: the file cannot be opened or is not a database of ours (`what` names it).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(path, os.O_CREAT | os.O_RDWR, 0o600))
        os.chmod(path, 0o600)
        # Opened on a worker thread, used on the event loop: one user at a time.
        db = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        db.execute("PRAGMA journal_mode=WAL")
        # Written on the event loop: no fsync per write (a power cut may lose the last
        # records, never the file).
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute(schema)
        return db
    except (OSError, sqlite3.Error) as exc:
        raise error(f"cannot open the {what} {path}: {exc}") from exc
