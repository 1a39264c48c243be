"""This machine's own files: chat history stays private whatever the umask of the
process that opens it (the TUI runs under the person's usual umask, often 0022)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from volunteer.chat.store import ChatStore, StoredMessage

pytestmark = pytest.mark.skipif(os.name != "posix", reason="file modes are POSIX")


@pytest.fixture
def open_umask() -> Iterator[None]:
    previous = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _write_a_chat(path: Path) -> ChatStore:
    store = ChatStore.open(path)
    chat = store.create("secret", None, {})
    store.append(chat, StoredMessage("user", "my bank password is hunter2", 0.0))
    return store


def test_a_new_chat_store_and_its_wal_files_are_private(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "data" / "chats.sqlite3"
    with _write_a_chat(path):
        files = [path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")]
        assert all(each.exists() for each in files)  # WAL mode: written while open
        assert {each.name: _mode(each) for each in files} == {each.name: 0o600 for each in files}
    assert _mode(path.parent) == 0o700


def test_an_older_readable_chat_store_is_tightened(tmp_path: Path, open_umask: None) -> None:
    path = tmp_path / "chats.sqlite3"
    _write_a_chat(path).close()
    path.chmod(0o644)
    with ChatStore.open(path) as store:
        assert _mode(path) == 0o600
        assert [c.title for c in store.list()] == ["secret"]
