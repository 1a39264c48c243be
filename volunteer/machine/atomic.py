"""Atomic writes into folders that several processes share (the model cache).

A file or folder is built under a temporary name beside its destination, flushed, then
renamed into place, so readers see either nothing or a complete copy. A full disk is
turned into `DiskFullError` and the partial copy is removed. Temporary names start with
`.tmp-`; those a killed process left behind are swept once nothing has touched them for
a day.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from volunteer.errors import DiskFullError

TMP_PREFIX = ".tmp-"
STALE_TMP_AGE_S = 24 * 3600.0
"""A temporary entry untouched this long belongs to a dead process (a download in
progress writes every few seconds)."""


@contextlib.contextmanager
def staging_dir(dest: Path) -> Iterator[Path]:
    """Yields an empty temporary folder beside `dest`; removes it afterwards.

    The caller fills it and publishes it with `publish_dir`; whatever is left (after an
    error, or after losing a race) is deleted on exit.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        with disk_full_as_error(dest):
            yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def publish_dir(tmp: Path, dest: Path) -> bool:
    """Renames the finished folder `tmp` to `dest`.

    Returns:
        True if ours was published; False if another process published `dest` first
        (then `tmp` is left for `staging_dir` to delete, and theirs is kept).
    """
    _fsync_tree(tmp)
    try:
        os.rename(tmp, dest)
    except OSError as exc:
        if exc.errno in (errno.EEXIST, errno.ENOTEMPTY) or dest.exists():
            return False
        raise
    _fsync_dir(dest.parent)
    return True


def write_file_atomic(dest: Path, data: bytes) -> None:
    """Writes `data` to `dest` through a temporary file and a rename."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{dest.name}-", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with disk_full_as_error(dest), os.fdopen(fd, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_disk_full(exc: OSError) -> bool:
    """Whether an OSError means the disk (or the user's quota) is full."""
    return exc.errno in DISK_FULL_ERRNOS


@contextlib.contextmanager
def disk_full_as_error(dest: Path) -> Iterator[None]:
    """Turns ENOSPC/EDQUOT raised inside the block into `DiskFullError`."""
    try:
        yield
    except OSError as exc:
        if is_disk_full(exc):
            raise DiskFullError(
                f"no space left on the disk while writing {dest}; free some space "
                f"(or set VOLUNTEER_CACHE_DIR to a larger disk) and try again"
            ) from exc
        raise


def remove_stale_tmp(
    parent: Path, *, max_age_s: float = STALE_TMP_AGE_S, now_s: float | None = None
) -> list[Path]:
    """Deletes the `.tmp-*` entries of `parent` that nothing has written for `max_age_s`.

    Args:
        parent: the folder whose temporary entries are swept (not recursively).
        max_age_s: how long an entry and everything in it must have been untouched.
        now_s: the current time (`time.time()` when None).

    Returns:
        The entries removed.
    """
    now_s = time.time() if now_s is None else now_s
    removed = []
    with contextlib.suppress(FileNotFoundError):
        for entry in sorted(parent.iterdir()):
            if entry.name.startswith(TMP_PREFIX) and now_s - _newest_mtime(entry) > max_age_s:
                if entry.is_dir():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
    return removed


def _newest_mtime(path: Path) -> float:
    # Another process may delete the entry while we walk it: then it is not stale.
    try:
        newest = path.stat().st_mtime
        for root, dirs, files in os.walk(path):
            for name in dirs + files:
                newest = max(newest, os.stat(os.path.join(root, name)).st_mtime)
    except FileNotFoundError:
        return float("inf")
    return newest


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            # Writable handle: Windows flushes only files opened for writing.
            with open(path, "r+b") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


def _fsync_dir(path: Path) -> None:
    # Directory fsync makes the rename durable on POSIX; Windows cannot open folders.
    if os.name != "posix":
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
