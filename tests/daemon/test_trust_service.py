"""The daemon's record of checked peers: kept in its data folder, and a file it cannot
open is left as it was while the daemon keeps its record in memory for this run."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest

from volunteer.daemon.local_checks import REPUTATION_FILE
from volunteer.daemon.trust_service import TrustService
from volunteer.paths import Paths


def _paths(tmp_path: Path) -> Paths:
    return Paths.resolve(home=tmp_path / "home", env={"VOLUNTEER_CACHE_DIR": str(tmp_path)})


def test_the_record_is_kept_across_restarts(tmp_path: Path) -> None:
    paths = _paths(tmp_path)

    async def run(peer_checks: int) -> tuple[int, int]:
        service = TrustService(paths, blocks=None)  # type: ignore[arg-type]  # peers() unused
        await service.start()
        for _ in range(peer_checks):
            service.reputation.record_check("peer", passed=True)
        status = service.status()
        await service.stop()
        return status.peers_checked, status.checks_passed

    assert asyncio.run(run(3)) == (1, 3)
    assert asyncio.run(run(1)) == (1, 4)


def test_a_file_it_cannot_open_is_kept_and_the_record_lives_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = _paths(tmp_path)
    path = paths.data_dir / REPUTATION_FILE
    path.parent.mkdir(parents=True)
    garbage = b"this is someone else's file" * 50
    path.write_bytes(garbage)

    async def run() -> int:
        service = TrustService(paths, blocks=None)  # type: ignore[arg-type]
        with caplog.at_level(logging.ERROR):
            await service.start()
        service.reputation.ban("cheat", "wrong output")
        banned = service.status().peers_banned
        await service.stop()
        return banned

    assert asyncio.run(run()) == 1
    assert "in memory only" in caplog.text
    assert path.read_bytes() == garbage
