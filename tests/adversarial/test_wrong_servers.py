"""A server that answers wrong on purpose, among real daemons on loopback serving the real
SmolLM2: with every step checked, chat through the swarm answers exactly what the model
answers locally, and the client bans the cheat within a few of its steps.

The swarm: a bootstrap daemon that serves nothing and runs the client, one server of
blocks 0:15, and two of 15:30, one of them a drill (`--faults perturb:1.0:0.05`). The
client decides a mismatch on 15:30 with the blocks loaded from its own model files.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.homes import DaemonSwarm, Homes
from volunteer.control.endpoint import use_tcp
from volunteer.paths import Paths
from volunteer.trust.reputation import Reputation

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

PROMPT = "Write a short story about a robot who learns to paint."
NEW_TOKENS = "24"
CHAT_TIMEOUT_S = 240
MAX_CHEAT_STEPS = 20


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[DaemonSwarm]:
    homes = Homes(tmp_path_factory.mktemp("wrong"))
    swarm = DaemonSwarm(homes, smollm2_folder, new_tokens=NEW_TOKENS, chat_timeout_s=CHAT_TIMEOUT_S)
    try:
        swarm.start("boot", "--num-blocks", "0")
        swarm.start("first", "--blocks", "0:15")
        swarm.start("honest", "--blocks", "15:30")
        swarm.start("cheat", "--blocks", "15:30", "--faults", "perturb:1.0:0.05")
        yield swarm
    finally:
        homes.reap()


def test_a_drill_says_so_in_its_status(swarm: DaemonSwarm) -> None:
    assert swarm.started["cheat"]["faults"] == "perturb:1:0.05"
    assert swarm.started["honest"].get("faults") is None


def test_checked_chat_equals_local_and_the_cheat_is_banned(swarm: DaemonSwarm) -> None:
    local = swarm.chat("--local", "--model", str(swarm.model), PROMPT)
    assert local.returncode == 0, local.stderr
    checked = swarm.chat("--verify", "all", PROMPT)
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout == local.stdout

    boot = Paths.resolve(home=swarm.homes.home("boot"), env=swarm.homes.env)
    reputation = Reputation(boot.data_dir / "reputation.sqlite3")
    try:
        cheat = swarm.started["cheat"]["peer_id"]
        honest = swarm.started["honest"]["peer_id"]
        assert reputation.is_banned(cheat), [vars(p) for p in reputation]
        assert "wrong output on blocks 15:30" in reputation.of(cheat).ban_reason
        assert not reputation.is_banned(honest)
        assert reputation.of(honest).passed >= 1
    finally:
        reputation.close()
    served = swarm.homes.status(swarm.homes.home("cheat"))["requests_served"]
    assert served <= MAX_CHEAT_STEPS


def test_peers_and_status_show_the_ban(swarm: DaemonSwarm) -> None:
    boot = swarm.homes.home("boot")
    listed = swarm.homes.cli(boot, "peers", "--json")
    assert listed.returncode == 0, listed.stderr
    peers = {peer["peer_id"]: peer for peer in json.loads(listed.stdout)["peers"]}
    cheat = peers[swarm.started["cheat"]["peer_id"]]
    assert cheat["blocks"] == [15, 30] and cheat["failed"] >= 1
    assert cheat["banned_until_s"] > time.time()
    assert "wrong output" in cheat["ban_reason"]
    honest = peers[swarm.started["honest"]["peer_id"]]
    assert honest["banned_until_s"] is None and honest["standing"] > cheat["standing"]
    text = swarm.homes.cli(boot, "peers").stdout
    assert "banned until" in text and swarm.started["cheat"]["peer_id"] in text
    status = swarm.homes.status(boot)
    assert status["peers_banned"] == 1 and status["checks_failed"] >= 1
