"""A server that answers wrong on purpose, among real daemons on loopback serving the real
SmolLM2: with every step checked, chat through the swarm answers exactly what the model
answers locally, the client bans the cheat within a few of its steps, and the other
daemons ban it too within a minute, from the client's accusation alone (their validator
role is off: none of them checks the cheat itself). A daemon that files false
accusations (`--faults lie-accuse`) is banned by the others; whom it accused is not.

The swarm: a bootstrap daemon that serves nothing and runs the client, one server of
blocks 0:15, and two of 15:30, one of them a drill (`--faults perturb:1.0:0.05`). The
client decides a mismatch on 15:30 with the blocks loaded from its own model files.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon.homes import DaemonSwarm, Homes
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import use_tcp
from volunteer.control.messages import LEADERBOARD
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
SWARM_BAN_S = 60.0
LIAR_BAN_S = 120.0
CREDIT_BOUND_S = 90.0


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[DaemonSwarm]:
    homes = Homes(tmp_path_factory.mktemp("wrong"))
    swarm = DaemonSwarm(
        homes,
        smollm2_folder,
        new_tokens=NEW_TOKENS,
        chat_timeout_s=CHAT_TIMEOUT_S,
    )
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


def _peers(swarm: DaemonSwarm, name: str) -> dict[str, dict]:
    listed = swarm.homes.cli(swarm.homes.home(name), "peers", "--json")
    assert listed.returncode == 0, listed.stderr
    return {peer["peer_id"]: peer for peer in json.loads(listed.stdout)["peers"]}


def _wait_for_bans(swarm: DaemonSwarm, peer: str, judges: list[str], timeout_s: float) -> dict:
    """Each judge's report of `peer`, once every judge bans it (or the deadline passes)."""
    deadline = time.monotonic() + timeout_s
    while True:
        reports = {judge: _peers(swarm, judge).get(peer, {}) for judge in judges}
        if all(r.get("banned_until_s") for r in reports.values()) or time.monotonic() > deadline:
            return reports
        time.sleep(2.0)


def test_the_other_daemons_ban_the_cheat_from_the_accusation_within_a_minute(
    swarm: DaemonSwarm,
) -> None:
    cheat = swarm.started["cheat"]["peer_id"]
    boot_id = swarm.started["boot"]["peer_id"]
    banned_by_boot = _peers(swarm, "boot")[cheat]["banned_until_s"]
    reports = _wait_for_bans(swarm, cheat, ["first", "honest"], SWARM_BAN_S)
    daemons = {swarm.started[name]["peer_id"] for name in ("boot", "first", "honest")}
    for judge, report in reports.items():
        # Bans last the same here: their ends are as far apart as the bans themselves.
        assert report.get("banned_until_s"), (judge, report)
        assert report["banned_until_s"] - banned_by_boot <= SWARM_BAN_S, (judge, report)
        # From the accusation (the client's, or a daemon's that endorsed it), checked here.
        (accuser,) = re.findall(r"proven by (\w+), recomputed", report["ban_reason"])
        assert accuser in daemons - {swarm.started[judge]["peer_id"]}, (judge, report)
    assert any(f"proven by {boot_id}" in report["ban_reason"] for report in reports.values())
    status = swarm.homes.status(swarm.homes.home("first"))
    assert status["accusations_upheld"] >= 1 and status["accusations_refuted"] == 0
    assert swarm.homes.status(swarm.homes.home("boot"))["accusations_filed"] >= 1


def test_the_cheat_earns_no_credit_and_forfeits_its_escrow_on_every_board(
    swarm: DaemonSwarm,
) -> None:
    """Issue 17: the client receipts the cheat's work as found wrong (it earns nothing),
    and every daemon that banned it shows its escrow forfeited; the honest replica that
    did the work instead has credit, held in escrow as a newcomer's."""
    cheat = swarm.started["cheat"]["peer_id"]
    honest = swarm.started["honest"]["peer_id"]
    deadline = time.monotonic() + CREDIT_BOUND_S
    while True:
        boards = {name: _board(swarm, name) for name in ("boot", "first", "honest")}
        rows = [(board.get(cheat), board.get(honest)) for board in boards.values()]
        if all(c and h and c.forfeited and h.total > 0 for c, h in rows):
            break
        assert time.monotonic() < deadline, boards
        time.sleep(2.0)
    for cheat_row, honest_row in rows:
        assert cheat_row.total == 0.0 and cheat_row.recent_average == 0.0
        assert not honest_row.forfeited and honest_row.held == honest_row.total
    assert max(row.rank for row, _ in rows) == len(boards["boot"])  # the cheat ranks last


def _board(swarm: DaemonSwarm, name: str) -> dict:
    home = Paths.resolve(home=swarm.homes.home(name), env=swarm.homes.env)
    reply = ControlClient(home).call(LEADERBOARD, timeout_s=10)
    return {row.peer_id: row for row in reply.rows}


def test_a_false_accuser_loses_its_standing_and_the_accused_keep_theirs(
    swarm: DaemonSwarm,
) -> None:
    # Its validator probes servers every few seconds, and accuses each that passes.
    swarm.start("liar", "--num-blocks", "0", "--faults", "lie-accuse", "--validate-share", "0.5")
    liar = swarm.started["liar"]["peer_id"]
    judges = ["boot", "first", "honest"]
    reports = _wait_for_bans(swarm, liar, judges, LIAR_BAN_S)
    for judge, report in reports.items():
        assert report.get("banned_until_s"), (judge, report)
        assert "false accusation against" in report["ban_reason"], (judge, report)
    for judge in judges:
        peers = _peers(swarm, judge)
        for honest in ("first", "honest"):
            report = peers[swarm.started[honest]["peer_id"]]
            assert report["banned_until_s"] is None, (judge, honest, report)
    assert swarm.homes.status(swarm.homes.home("boot"))["accusations_refuted"] >= 1
