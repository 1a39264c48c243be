"""The chat store on real SQLite files: round trips, ordering, sharing, and refusing files it
does not own without touching them."""

from __future__ import annotations

import contextlib
import random
import sqlite3
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from volunteer.chat.store import (
    SCHEMA_VERSION,
    UNTITLED,
    ChatStore,
    ChatStoreError,
    ConversationSummary,
    StoredConversation,
    StoredMessage,
    UnknownConversationError,
    default_path,
    title_from,
)
from volunteer.paths import Paths

SETTINGS = {"temperature": 0.7, "top_p": 0.9, "max_new_tokens": 256, "stop": ["</s>"]}
ROUTE = (("12D3KooWpeerA", 0, 12), ("12D3KooWpeerB", 12, 24))


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self, now_s: float = 1000.0) -> None:
        self.now_s = now_s

    def __call__(self) -> float:
        return self.now_s


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "nested" / "data" / "chats.sqlite3"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(db_path: Path, clock: FakeClock) -> Iterator[ChatStore]:
    with ChatStore.open(db_path, clock=clock) as opened:
        yield opened


def _raw_count(path: Path, sql: str, *params: object) -> int:
    with contextlib.closing(sqlite3.connect(path)) as raw:
        return raw.execute(sql, params).fetchone()[0]


def test_conversation_round_trips_with_messages_and_routes(store: ChatStore) -> None:
    conversation_id = store.create("Rust lifetimes", "You are terse.", SETTINGS)
    messages = (
        StoredMessage("user", "What is 'a?", created_at_s=1.5),
        StoredMessage("assistant", "A lifetime.\nSee the book.", 2.5, 7, 0.42, ROUTE),
        StoredMessage("user", "Thanks ✓", created_at_s=3.5),
    )
    for message in messages:
        store.append(conversation_id, message)

    loaded = store.load(conversation_id)

    assert loaded == StoredConversation(
        conversation_id, "Rust lifetimes", "You are terse.", SETTINGS, messages
    )
    assert loaded.messages[1].route == ROUTE  # tuples again, not JSON lists
    assert store.load(store.create("empty", None, {})).messages == ()


def test_list_is_newest_updated_first_with_counts(store: ChatStore, clock: FakeClock) -> None:
    ids = []
    for title in ("first", "second", "third"):
        clock.now_s += 10
        ids.append(store.create(title, None, SETTINGS))
    clock.now_s += 10
    store.append(ids[0], StoredMessage("user", "hi", created_at_s=clock.now_s))
    store.rename(ids[1], "second, renamed")  # a rename does not move it up

    summaries = store.list()

    assert summaries == [
        ConversationSummary(ids[0], "first", 1010.0, 1040.0, 1),
        ConversationSummary(ids[2], "third", 1030.0, 1030.0, 0),
        ConversationSummary(ids[1], "second, renamed", 1020.0, 1020.0, 0),
    ]
    assert [s.id for s in store.list(limit=2)] == [ids[0], ids[2]]
    assert store.list(limit=0) == []


def test_rename_and_update_settings_are_stored(store: ChatStore) -> None:
    conversation_id = store.create("old", "be kind", SETTINGS)
    store.rename(conversation_id, "new")
    store.update_settings(conversation_id, None, {"temperature": 0.0})

    loaded = store.load(conversation_id)

    assert (loaded.title, loaded.system_prompt, loaded.settings) == (
        "new",
        None,
        {"temperature": 0.0},
    )


def test_delete_removes_the_conversation_and_its_messages(store: ChatStore, db_path: Path) -> None:
    kept = store.create("kept", None, {})
    gone = store.create("gone", None, {})
    for conversation_id in (kept, gone, gone):
        store.append(conversation_id, StoredMessage("user", "x", created_at_s=1.0))

    store.delete(gone)

    with pytest.raises(UnknownConversationError):
        store.load(gone)
    assert [s.id for s in store.list()] == [kept]
    sql = "SELECT COUNT(*) FROM messages WHERE conversation_id = ?"
    assert _raw_count(db_path, sql, gone) == 0  # the cascade, not just a hidden parent row
    assert _raw_count(db_path, sql, kept) == 1


def test_reopening_keeps_everything_and_never_reuses_ids(db_path: Path, clock: FakeClock) -> None:
    with ChatStore.open(db_path, clock=clock) as store:
        kept = store.create("kept", "sys", SETTINGS)
        store.append(kept, StoredMessage("assistant", "hello", 1.0, 3, 0.1, ROUTE))
        newest = store.create("newest", None, {})
        store.delete(newest)
        before = store.load(kept)

    with ChatStore.open(db_path, clock=clock) as store:
        assert store.load(kept) == before
        assert [s.id for s in store.list()] == [kept]
        # A screen still holding the deleted id must not write into a new conversation.
        assert store.create("another", None, {}) > newest


def test_the_file_runs_in_wal_mode_with_the_current_schema_version(store: ChatStore) -> None:
    with contextlib.closing(sqlite3.connect(store.path)) as raw:
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_second_store_on_the_same_file_sees_the_first_ones_writes(db_path: Path) -> None:
    with ChatStore.open(db_path) as first, ChatStore.open(db_path) as second:
        conversation_id = first.create("shared", None, SETTINGS)
        first.append(conversation_id, StoredMessage("user", "from first", created_at_s=1.0))

        assert [s.title for s in second.list()] == ["shared"]
        second.append(conversation_id, StoredMessage("assistant", "from second", 2.0))
        second.rename(conversation_id, "renamed by second")

        loaded = first.load(conversation_id)
        assert loaded.title == "renamed by second"
        assert [m.content for m in loaded.messages] == ["from first", "from second"]


def _assert_refused_untouched(path: Path, match: str) -> None:
    before = path.read_bytes()
    siblings = sorted(path.parent.iterdir())
    with pytest.raises(ChatStoreError, match=match):
        ChatStore.open(path)
    assert path.read_bytes() == before
    assert sorted(path.parent.iterdir()) == siblings  # no -wal, -shm or -journal left


def test_a_file_of_random_bytes_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(random.Random(0).randbytes(8192))
    _assert_refused_untouched(path, "not a SQLite database")


def test_a_sqlite_header_over_garbage_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    path.write_bytes(b"SQLite format 3\x00" + random.Random(1).randbytes(8192))
    _assert_refused_untouched(path, str(path))


def test_a_newer_schema_version_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute("CREATE TABLE conversations_v2 (id INTEGER PRIMARY KEY)")
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
        raw.commit()
    _assert_refused_untouched(path, "newer")


def test_another_programs_database_is_refused_and_left_as_it_was(tmp_path: Path) -> None:
    path = tmp_path / "chats.sqlite3"
    with contextlib.closing(sqlite3.connect(path)) as raw:
        raw.execute("CREATE TABLE bookmarks (url TEXT)")
        raw.commit()
    _assert_refused_untouched(path, "another program")


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.load(999),
        lambda s: s.append(999, StoredMessage("user", "x", created_at_s=0.0)),
        lambda s: s.rename(999, "x"),
        lambda s: s.update_settings(999, None, {}),
        lambda s: s.delete(999),
    ],
    ids=["load", "append", "rename", "update_settings", "delete"],
)
def test_unknown_ids_raise_and_write_nothing(
    store: ChatStore, call: Callable[[ChatStore], object]
) -> None:
    with pytest.raises(ChatStoreError, match="999"):
        call(store)
    assert store.list() == []
    assert _raw_count(store.path, "SELECT COUNT(*) FROM messages") == 0


def test_a_closed_store_raises_a_store_error(db_path: Path) -> None:
    store = ChatStore.open(db_path)
    store.close()
    store.close()  # harmless twice
    with pytest.raises(ChatStoreError, match="closed"):
        store.list()


def test_default_path_is_in_the_data_dir(tmp_path: Path) -> None:
    paths = Paths.resolve(home=tmp_path, env={})
    assert default_path(paths) == paths.data_dir / "chats.sqlite3"


@pytest.mark.parametrize(
    ("message", "max_chars", "expected"),
    [
        ("Hello there", 48, "Hello there"),
        (
            "\n  \n  Explain   the\tborrow checker  \nplease, with examples",
            48,
            "Explain the borrow checker",
        ),
        ("one two three four", 12, "one two…"),
        ("one two, three four", 12, "one two…"),  # no dangling comma before the ellipsis
        ("abcdefghijklmnop", 8, "abcdefg…"),  # one long word is cut mid-word
        ("exactly eight", 13, "exactly eight"),
        ("   \n\t ", 48, UNTITLED),
        ("", 48, UNTITLED),
    ],
)
def test_title_from(message: str, max_chars: int, expected: str) -> None:
    title = title_from(message, max_chars)
    assert title == expected
    assert len(title) <= max_chars


def test_title_from_rejects_a_limit_without_room() -> None:
    with pytest.raises(ValueError):
        title_from("hello", max_chars=1)


def test_concurrent_appends_from_threads_and_a_second_store_all_land(db_path: Path) -> None:
    threads, per_thread = 8, 25
    with ChatStore.open(db_path) as shared, ChatStore.open(db_path) as other:
        conversation_id = shared.create("busy", None, {})
        start = threading.Barrier(threads)

        def writer(worker: int) -> None:
            store = shared if worker % 2 else other  # both threads and connections contend
            start.wait()
            for n in range(per_thread):
                message = StoredMessage("user", f"{worker}:{n}", float(n), n, 0.01, ROUTE)
                store.append(conversation_id, message)

        with ThreadPoolExecutor(threads) as pool:
            for future in [pool.submit(writer, worker) for worker in range(threads)]:
                future.result()

        contents = [m.content for m in other.load(conversation_id).messages]
    assert len(contents) == threads * per_thread
    for worker in range(threads):
        own = [c for c in contents if c.startswith(f"{worker}:")]
        assert own == [f"{worker}:{n}" for n in range(per_thread)]  # each thread's order kept
