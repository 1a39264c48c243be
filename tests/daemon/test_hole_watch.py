"""Which records cover a block in a hole watch's eyes (`HoleWatch.coverage`)."""

from __future__ import annotations

import random
from pathlib import Path

from volunteer.scheduler.holes import holes

from tests.swarm.test_records import make_info
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.hole_watch import JOINING_TRUST_S, HoleWatch
from volunteer.paths import Paths
from volunteer.settings import Settings
from volunteer.swarm.records import ServerInfo, ServerState, SwarmSnapshot


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _service(tmp_path: Path) -> BlockService:
    # Never started: coverage reads only the snapshot given, and what pings found.
    settings = Settings()
    paths = Paths.resolve(home=tmp_path, env={})
    return BlockService(settings, paths, DHTService(settings), owner=b"me")


def _watch(tmp_path: Path, clock: Clock, service: BlockService | None = None) -> HoleWatch:
    service = service or _service(tmp_path)
    return HoleWatch(service, rng=random.Random(0), clock=clock)


def _snapshot(records: dict[str, list[ServerInfo]]) -> SwarmSnapshot:
    entries = [
        (index, peer_id, info)
        for peer_id, infos in records.items()
        for info in infos
        for index in range(info.start, info.end)
    ]
    return SwarmSnapshot.build("m", 6, entries)


def _info(start: int, end: int, state: ServerState = ServerState.ONLINE) -> ServerInfo:
    return make_info(start=start, end=end, state=state, model="m")


def test_leaving_and_offline_servers_leave_a_hole(tmp_path: Path) -> None:
    watch = _watch(tmp_path, Clock())
    snapshot = _snapshot(
        {
            "a": [_info(0, 2)],
            "b": [_info(2, 4, ServerState.LEAVING)],
            "c": [_info(4, 6, ServerState.OFFLINE)],
        }
    )
    counts, spans = watch.coverage(snapshot)
    assert counts == [1, 1, 0, 0, 0, 0]
    assert spans == {"a": (0, 2)}


def test_a_move_under_way_covers_its_blocks_for_a_while(tmp_path: Path) -> None:
    clock = Clock()
    watch = _watch(tmp_path, clock)
    # "a" serves 0:2 and loads 2:4; "fresh" says it loads 4:6 but serves nothing.
    snapshot = _snapshot(
        {
            "a": [_info(0, 2), _info(2, 4, ServerState.JOINING)],
            "fresh": [_info(4, 6, ServerState.JOINING)],
        }
    )
    counts, _ = watch.coverage(snapshot)
    assert counts == [1, 1, 1, 1, 0, 0]
    clock.now += JOINING_TRUST_S - 1
    assert watch.coverage(snapshot)[0] == [1, 1, 1, 1, 0, 0]
    # A move that never finishes stops holding the hole open.
    clock.now += 2
    counts, _ = watch.coverage(snapshot)
    assert holes(counts) == [(2, 6)]


def test_a_server_found_dead_covers_nothing(tmp_path: Path) -> None:
    service = _service(tmp_path)
    watch = _watch(tmp_path, Clock(), service)
    snapshot = _snapshot({"a": [_info(0, 3)], "dead": [_info(3, 6)]})
    assert holes(watch.coverage(snapshot)[0]) == []
    service.liveness.dead["dead"] = 1000.0  # what two missed pings do (`Liveness`)
    counts, spans = watch.coverage(snapshot)
    assert holes(counts) == [(3, 6)] and "dead" not in spans
