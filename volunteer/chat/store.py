"""Saved chat conversations in one SQLite file (`<data_dir>/chats.sqlite3`).

The TUI's chat screen writes from worker threads while a second process (another TUI, or
`volunteer chat`) may have the same file open, so the database runs in WAL mode with a
busy timeout, every write is one `BEGIN IMMEDIATE` transaction, and one lock serialises
this object's threads over its single connection.

The store never deletes or rewrites a file it does not recognise: a file that is not
SQLite, a foreign SQLite database, or one written by a newer volunteer raises
`ChatStoreError` before anything is written.

Chats are private: the file is created (or tightened to) mode 0600 whatever the opening
process's umask, and SQLite gives its -wal and -shm files the database file's mode. Errors::

    VolunteerError                     volunteer.errors
    └── ChatStoreError                 unreadable, foreign or newer file; SQLite failures
        └── UnknownConversationError   no conversation has that id (deleted, or never was)
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from volunteer.errors import VolunteerError
from volunteer.paths import Paths

SCHEMA_VERSION = 1
"""Stored in `PRAGMA user_version`; bump it and add a migration step when the schema changes."""
BUSY_TIMEOUT_S = 5.0
"""How long a write waits for another process's transaction before giving up."""
SQLITE_MAGIC = b"SQLite format 3\x00"
UNTITLED = "New chat"
"""`title_from` of a message with no visible text."""

# AUTOINCREMENT: a deleted id is never handed out again, so a screen still holding one gets
# UnknownConversationError instead of writing into another conversation.
_SCHEMA = (
    "CREATE TABLE conversations (id INTEGER PRIMARY KEY AUTOINCREMENT, title TEXT NOT NULL,"
    " system_prompt TEXT, settings_json TEXT NOT NULL, created_at_s REAL NOT NULL,"
    " updated_at_s REAL NOT NULL)",
    "CREATE TABLE messages (id INTEGER PRIMARY KEY, conversation_id INTEGER NOT NULL"
    " REFERENCES conversations (id) ON DELETE CASCADE, role TEXT NOT NULL, content TEXT NOT NULL,"
    " created_at_s REAL NOT NULL, tokens INTEGER, seconds REAL, route_json TEXT NOT NULL)",
    "CREATE INDEX messages_by_conversation ON messages (conversation_id, id)",
    "CREATE INDEX conversations_by_update ON conversations (updated_at_s DESC, id DESC)",
)


class ChatStoreError(VolunteerError):
    """The chat database cannot be opened, read or written."""


class UnknownConversationError(ChatStoreError):
    """No conversation has the given id."""


@dataclasses.dataclass(frozen=True)
class StoredMessage:
    """One message of a conversation.

    `tokens`, `seconds` and `route` describe what an assistant reply took: tokens
    generated, wall time, and the `(peer_id, start_block, end_block)` servers that ran it.
    """

    role: str
    content: str
    created_at_s: float
    tokens: int | None = None
    seconds: float | None = None
    route: tuple[tuple[str, int, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class ConversationSummary:
    """A conversation as the list of chats shows it.

    `updated_at_s` is the time of the last `append` (creation time until then); renaming
    or changing settings does not move a conversation up the list.
    """

    id: int
    title: str
    created_at_s: float
    updated_at_s: float
    message_count: int


@dataclasses.dataclass(frozen=True)
class StoredConversation:
    """A whole conversation; `settings` holds sampling settings (temperature, top_p, ...)."""

    id: int
    title: str
    system_prompt: str | None
    settings: dict[str, Any]
    messages: tuple[StoredMessage, ...]


def default_path(paths: Paths) -> Path:
    """Where the chat store of this volunteer instance lives."""
    return paths.data_dir / "chats.sqlite3"


def title_from(first_user_message: str, max_chars: int = 48) -> str:
    """A conversation title from its first user message.

    Takes the first line with text, collapses its whitespace, and cuts it at a word
    boundary with an ellipsis so the result has at most `max_chars` characters.

    Raises:
        ValueError: `max_chars` leaves no room for a character and the ellipsis.
    """
    if max_chars < 2:
        raise ValueError(f"max_chars must be at least 2, got {max_chars}")
    lines = (" ".join(line.split()) for line in first_user_message.splitlines())
    line = next((text for text in lines if text), "")
    if not line:
        return UNTITLED
    if len(line) <= max_chars:
        return line
    cut = line[: max_chars - 1]
    if line[max_chars - 1] != " " and " " in cut:
        cut = cut.rsplit(" ", 1)[0]  # drop the word the limit split
    return cut.rstrip(" ,;:.-") + "…"


@contextlib.contextmanager
def _as_store_errors(path: Path) -> Iterator[None]:
    # ProgrammingError (a bad query, a closed cursor) is our bug and is left alone.
    try:
        yield
    except sqlite3.ProgrammingError:
        raise
    except sqlite3.Error as exc:
        raise ChatStoreError(f"chat store {path}: {exc}") from exc


class ChatStore:
    """Conversations and their messages in one SQLite file; safe to share across threads.

    Build one with `ChatStore.open`; the constructor only wraps an open connection. Every
    method taking a `conversation_id` raises `UnknownConversationError` when none has it,
    and any method raises `ChatStoreError` when SQLite fails (a lock held past
    `BUSY_TIMEOUT_S`, a full disk) or the store is closed.
    """

    def __init__(
        self, connection: sqlite3.Connection, *, path: Path, clock: Callable[[], float]
    ) -> None:
        self.path = path
        self._connection = connection
        self._is_closed = False
        self._clock = clock
        self._lock = threading.Lock()

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], float] = time.time) -> ChatStore:
        """Opens (creating it and its folders if needed) the chat store at `path`.

        Args:
            path: the database file, usually `default_path(paths)`.
            clock: returns the current time in seconds; tests pass a fake one.

        Raises:
            ChatStoreError: `path` is not a SQLite file, belongs to another program, was
                written by a newer volunteer, or cannot be opened. The file is left as is.
        """
        path = Path(path)
        try:
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise ChatStoreError(
                f"cannot create the folder of the chat store {path}: {exc}"
            ) from exc
        _check_magic(path)
        _make_private(path)
        with _as_store_errors(path):
            # Autocommit mode: transactions are begun explicitly (see `_transaction`).
            connection = sqlite3.connect(
                path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
            )
        try:
            with _as_store_errors(path):
                _prepare(connection, path)
        except BaseException:
            connection.close()
            raise
        return cls(connection, path=path, clock=clock)

    def close(self) -> None:
        """Closes the connection; later calls raise `ChatStoreError`. Safe to repeat."""
        with self._lock:
            if not self._is_closed:
                self._is_closed = True
                self._connection.close()

    def __enter__(self) -> ChatStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def create(self, title: str, system_prompt: str | None, settings: Mapping[str, Any]) -> int:
        """Adds an empty conversation and returns its id.

        Args:
            title: shown in the list of chats (see `title_from`).
            system_prompt: the system message, or None for none.
            settings: JSON-able sampling settings with string keys.
        """
        settings_json = json.dumps(dict(settings))
        now_s = self._clock()
        with self._transaction() as db:
            cursor = db.execute(
                "INSERT INTO conversations"
                " (title, system_prompt, settings_json, created_at_s, updated_at_s)"
                " VALUES (?, ?, ?, ?, ?)",
                (title, system_prompt, settings_json, now_s, now_s),
            )
        assert cursor.lastrowid is not None  # an INSERT into a rowid table always sets it
        return cursor.lastrowid

    def append(self, conversation_id: int, message: StoredMessage) -> None:
        """Adds `message` at the end of a conversation and marks it updated now."""
        route_json = json.dumps([list(hop) for hop in message.route])
        row = {**dataclasses.asdict(message), "route": route_json, "id": conversation_id}
        with self._transaction() as db:
            self._update(db, conversation_id, "updated_at_s = ?", (self._clock(),))
            db.execute(
                "INSERT INTO messages (conversation_id, role, content, created_at_s, tokens,"
                " seconds, route_json)"
                " VALUES (:id, :role, :content, :created_at_s, :tokens, :seconds, :route)",
                row,
            )

    def rename(self, conversation_id: int, title: str) -> None:
        """Changes a conversation's title."""
        with self._transaction() as db:
            self._update(db, conversation_id, "title = ?", (title,))

    def update_settings(
        self, conversation_id: int, system_prompt: str | None, settings: Mapping[str, Any]
    ) -> None:
        """Replaces a conversation's system prompt and sampling settings."""
        values = (system_prompt, json.dumps(dict(settings)))
        with self._transaction() as db:
            self._update(db, conversation_id, "system_prompt = ?, settings_json = ?", values)

    def delete(self, conversation_id: int) -> None:
        """Deletes a conversation and (by cascade) its messages."""
        with self._transaction() as db:
            cursor = db.execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))
            if cursor.rowcount == 0:
                raise UnknownConversationError(f"no conversation with id {conversation_id}")

    def list(self, limit: int = 100) -> builtins.list[ConversationSummary]:
        """The `limit` most recently updated conversations, newest first."""
        if limit < 0:
            raise ValueError(f"limit must be >= 0, got {limit}")
        with self._transaction(is_write=False) as db:
            rows = db.execute(
                "SELECT c.id, c.title, c.created_at_s, c.updated_at_s,"
                " (SELECT COUNT(*) FROM messages AS m WHERE m.conversation_id = c.id)"
                " FROM conversations AS c ORDER BY c.updated_at_s DESC, c.id DESC LIMIT ?",
                (limit,),
            ).fetchall()
        return [ConversationSummary(*row) for row in rows]

    def load(self, conversation_id: int) -> StoredConversation:
        """A conversation with all its messages, oldest first.

        Raises:
            ChatStoreError: its stored settings or routes are not JSON of their shape.
        """
        # One read transaction: another process's append cannot land between the queries.
        with self._transaction(is_write=False) as db:
            head = db.execute(
                "SELECT title, system_prompt, settings_json FROM conversations WHERE id = ?",
                (conversation_id,),
            ).fetchone()
            rows = db.execute(
                "SELECT role, content, created_at_s, tokens, seconds, route_json FROM messages"
                " WHERE conversation_id = ? ORDER BY id",
                (conversation_id,),
            ).fetchall()
        if head is None:
            raise UnknownConversationError(f"no conversation with id {conversation_id}")
        title, system_prompt, settings_json = head
        where = f"chat store {self.path}, conversation {conversation_id}"
        settings = _decode_json(settings_json, where)
        if not isinstance(settings, dict):
            raise ChatStoreError(f"{where}: the settings are not a JSON object")
        messages = tuple(_message_from(row, where) for row in rows)
        return StoredConversation(conversation_id, title, system_prompt, settings, messages)

    @contextlib.contextmanager
    def _transaction(self, *, is_write: bool = True) -> Iterator[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front, so two processes never both read and
        # then fail to upgrade (a deadlock the busy timeout cannot resolve).
        with self._lock:
            if self._is_closed:
                raise ChatStoreError(f"chat store {self.path} is closed")
            db = self._connection
            with _as_store_errors(self.path):
                db.execute("BEGIN IMMEDIATE" if is_write else "BEGIN")
                try:
                    yield db
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:  # SQLite itself rolls back after some errors
                        db.execute("ROLLBACK")
                    raise

    @staticmethod
    def _update(
        db: sqlite3.Connection, conversation_id: int, assignments: str, values: tuple[object, ...]
    ) -> None:
        # `assignments` is always a literal of this module; values go in as parameters.
        sql = f"UPDATE conversations SET {assignments} WHERE id = ?"
        cursor = db.execute(sql, (*values, conversation_id))
        if cursor.rowcount == 0:
            raise UnknownConversationError(f"no conversation with id {conversation_id}")


def _decode_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ChatStoreError(f"{where}: invalid JSON ({exc})") from exc


def _message_from(row: tuple[Any, ...], where: str) -> StoredMessage:
    role, content, created_at_s, tokens, seconds, route_json = row
    try:
        route = tuple(
            (str(peer), int(start), int(end))
            for peer, start, end in _decode_json(route_json, where)
        )
    except (TypeError, ValueError) as exc:
        raise ChatStoreError(f"{where}: a route is not a list of [peer_id, start, end]") from exc
    return StoredMessage(role, content, created_at_s, tokens, seconds, route)


def _check_magic(path: Path) -> None:
    # Read the header ourselves: SQLite only notices a foreign file on first use, and we
    # want to be sure nothing (journal mode, schema) is ever written into one.
    try:
        with open(path, "rb") as handle:
            header = handle.read(len(SQLITE_MAGIC))
    except FileNotFoundError:
        return
    except OSError as exc:
        raise ChatStoreError(f"cannot read the chat store {path}: {exc}") from exc
    if header and header != SQLITE_MAGIC:
        raise ChatStoreError(f"{path} is not a SQLite database; move it away to start afresh")


def _make_private(path: Path) -> None:
    """Creates the database file 0600 (SQLite takes an empty file as a new database), or
    makes an existing one and its -wal and -shm files 0600 (Windows: left writable)."""
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        for suffix in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)
    except OSError as exc:
        raise ChatStoreError(f"cannot create the chat store {path}: {exc}") from exc


def _prepare(connection: sqlite3.Connection, path: Path) -> None:
    """Checks the file's version, then switches to WAL and creates the schema if new."""
    version = _read_version(connection, path)
    connection.execute("PRAGMA foreign_keys = ON")  # per connection, off by default
    # WAL lets readers run beside one writer; a filesystem without shared memory keeps
    # the old journal, which is slower but still correct, so the answer is not checked.
    connection.execute("PRAGMA journal_mode = WAL")
    if version == SCHEMA_VERSION:
        return
    connection.execute("BEGIN IMMEDIATE")
    try:
        # Read again under the write lock: another process may have created it meanwhile.
        if _read_version(connection, path) == 0:
            # One statement at a time: executescript would COMMIT our transaction first.
            for statement in _SCHEMA:
                connection.execute(statement)
            connection.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


def _read_version(connection: sqlite3.Connection, path: Path) -> int:
    """`PRAGMA user_version`, refusing newer files and foreign databases."""
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version > SCHEMA_VERSION:
        raise ChatStoreError(
            f"chat store {path} has schema version {version}, newer than this volunteer's"
            f" {SCHEMA_VERSION}; upgrade volunteer to open it (the file is left unchanged)"
        )
    if version == 0:
        (tables,) = connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        if tables:
            raise ChatStoreError(f"{path} is another program's SQLite database; not opening it")
    return version
