"""A swarm serving 4-bit weights: two real daemons started with `--dtype q4` hold blocks
0:15 and 15:30 of the real SmolLM2, and greedy chat through them, every step checked by
recomputing it, equals `volunteer chat --local --dtype q4` token for token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.homes import DaemonSwarm, Homes
from volunteer.client.swarm_connection import SwarmConnection
from volunteer.control.endpoint import use_tcp
from volunteer.swarm.dht_records import read_snapshot_on_node

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

PROMPT = "Write a short story about a robot who learns to paint."
NEW_TOKENS = "32"


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[DaemonSwarm]:
    homes = Homes(tmp_path_factory.mktemp("q4-swarm"))
    swarm = DaemonSwarm(
        homes,
        smollm2_folder,
        new_tokens=NEW_TOKENS,
        chat_timeout_s=180,
        daemon_flags=("--dtype", "q4"),
    )
    try:
        swarm.start("boot", "--blocks", "0:15")
        swarm.start("second", "--blocks", "15:30")
        yield swarm
    finally:
        homes.reap()


@pytest.fixture(scope="module")
def local_story(swarm: DaemonSwarm) -> str:
    result = swarm.chat("--local", "--dtype", "q4", "--model", str(swarm.model), PROMPT)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout) > 60  # 32 tokens of a story, not an early stop
    return result.stdout


def test_servers_announce_their_weights_in_4_bits(swarm: DaemonSwarm) -> None:
    with SwarmConnection([swarm.join]) as connection:
        assert connection.node is not None
        snapshot = connection.loop_thread.run(
            read_snapshot_on_node(connection.node, swarm.model.name, 30, timeout_s=10),
            timeout_s=20,
        )
    servers = snapshot.spans()
    assert sorted((i.start, i.end) for i in servers.values()) == [(0, 15), (15, 30)]
    assert {info.dtype for info in servers.values()} == {"q4g32"}
    # And each says so in its status.
    assert all("weights in q4g32" in swarm.started[n]["span_reason"] for n in ("boot", "second"))


def test_checked_greedy_chat_through_q4_servers_equals_local_q4(
    swarm: DaemonSwarm, local_story: str
) -> None:
    """Every step is recomputed in 4 bits by the client: none is found wrong (a check in
    float32 would fail them all), and the text is the local model's."""
    result = swarm.chat("--verify", "all", PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == local_story
    assert "wrong" not in result.stderr


def test_a_client_joining_from_outside_routes_through_q4_servers_too(
    swarm: DaemonSwarm, local_story: str
) -> None:
    result = swarm.chat("--swarm", swarm.join, "--dtype", "q4", "--model", str(swarm.model), PROMPT)
    assert result.returncode == 0, result.stderr
    assert result.stdout == local_story
