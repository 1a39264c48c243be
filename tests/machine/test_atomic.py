"""Atomic publishing into the shared cache: a lost race keeps the winner's copy."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from volunteer.errors import DiskFullError
from volunteer.machine.atomic import disk_full_as_error, publish_dir, staging_dir


def test_second_publisher_loses_and_the_first_copy_survives(tmp_path: Path) -> None:
    dest = tmp_path / "models" / "m"
    with staging_dir(dest) as first, staging_dir(dest) as second:
        (first / "weights").write_text("first")
        (second / "weights").write_text("second")
        assert publish_dir(first, dest) is True
        assert publish_dir(second, dest) is False
    assert (dest / "weights").read_text() == "first"
    assert [p.name for p in dest.parent.iterdir()] == ["m"]  # no staging folder left


def test_staging_is_removed_after_an_error(tmp_path: Path) -> None:
    dest = tmp_path / "m"
    with pytest.raises(RuntimeError), staging_dir(dest) as work:
        (work / "partial").write_text("half")
        raise RuntimeError("import failed")
    assert list(tmp_path.iterdir()) == []


def test_disk_full_becomes_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DiskFullError, match="no space left"), disk_full_as_error(tmp_path):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError), disk_full_as_error(tmp_path):
        raise PermissionError(errno.EACCES, "denied")
