"""Daemons that choose their own blocks, and move when the swarm loses a span.

Real daemons on 127.0.0.1 with the real SmolLM2 (30 blocks), default settings: three
servers asking for 10 blocks each land on three different spans that cover the model; a
fourth doubles one span; when the only server of another span stops, it hands that span
over to the fourth, which moves there, and chat through the swarm works again. Then five
more join, every server of one span leaves at once, and exactly one of those that could
fill the hole does; last, the only server of a span pauses, and hands it over first
(issue 16).
"""

from __future__ import annotations

import collections
import json
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.daemon.homes import Homes
from tests.daemon.test_swarm_e2e import PARIS_PROMPT, Swarm
from volunteer.control.endpoint import use_tcp
from volunteer.control.messages import PAUSE, RESUME, SWARM

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

SERVERS = ("a", "b", "c")
NO_LOCAL_LINKS = "c"
MOVE_TIMEOUT_S = 60.0
HERD_SETTLE_S = 9.0
"""Long enough for two more turns at a hole (`hole_watch.TURN_S` each)."""
SERVERS_NOW: list[str] = []
"""The servers still serving after the move test (filled by it)."""


@pytest.fixture(scope="module")
def swarm(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[Swarm]:
    homes = Homes(tmp_path_factory.mktemp("scheduling"))
    swarm = Swarm(homes, smollm2_folder)
    try:
        swarm.start("boot", "--num-blocks", "0")
        for name in SERVERS:
            # One server keeps to p2p: it must announce no socket and serve none.
            local = ["--local-links", "no"] if name == NO_LOCAL_LINKS else []
            swarm.start(name, "--num-blocks", "10", *local)
        yield swarm
    finally:
        homes.reap()


def test_servers_choosing_their_own_blocks_land_on_different_spans(swarm: Swarm) -> None:
    statuses = {name: swarm.status(name) for name in SERVERS}
    spans = sorted(tuple(s["blocks"]) for s in statuses.values())
    assert spans == [(0, 10), (10, 20), (20, 30)]
    assert "no server holds any block yet" in statuses["a"]["span_reason"]
    assert all("weakest span" in statuses[n]["span_reason"] for n in ("b", "c"))
    # The bootstrap daemon, serving nothing, describes the swarm (for the TUI and profile).
    described = swarm.control("boot").call(SWARM, timeout_s=30).model_dump(mode="json")
    assert sorted((s["start"], s["end"]) for s in described["servers"]) == spans
    assert described["num_blocks"] == 30 and min(described["block_throughput"]) > 0
    # Each server announces its Unix socket for this machine's processes, unless told not to.
    sockets = {s["peer_id"]: s["local_socket"] for s in described["servers"]}
    for name, status in statuses.items():
        socket = sockets[status["peer_id"]]
        if name == NO_LOCAL_LINKS:
            assert socket is None and status["local_links"] is None
        else:
            assert socket is not None and Path(socket).exists() and status["local_links"] == 0
    # `volunteer profile` plans with the swarm the daemon sees (without the daemon's own
    # blocks): 10 blocks go where the slowest server is; on a server, its own span.
    profiled = swarm.homes.cli(
        swarm.homes.home("boot"), "profile", "--json", "--model", str(swarm.model),
        "--num-blocks", "10",
    )  # fmt: skip
    assert profiled.returncode == 0, profiled.stderr
    report = json.loads(profiled.stdout)
    decision = report["decision"]
    # Round trips to the three servers, measured from the daemon (its own: none here).
    assert len(report["peer_rtt_s"]) == 3
    assert all(0 < rtt < 5 for rtt in report["peer_rtt_s"].values())
    assert "running daemon sees it (3 other server(s) serving)" in decision["swarm_source"]
    slowest = min(statuses.values(), key=lambda s: (s["throughput"], s["blocks"][0]))
    assert decision["blocks"] == slowest["blocks"]
    on_a = swarm.homes.cli(
        swarm.homes.home("a"), "profile", "--json", "--model", str(swarm.model),
        "--num-blocks", "10",
    )  # fmt: skip
    assert on_a.returncode == 0, on_a.stderr
    assert json.loads(on_a.stdout)["decision"]["blocks"] == statuses["a"]["blocks"]


def test_a_server_moves_to_the_blocks_a_stopped_server_left(swarm: Swarm) -> None:
    # Default settings: no periodic check for minutes; the hole triggers the move.
    swarm.start("mover", "--num-blocks", "10")
    first = swarm.status("mover")
    doubled = tuple(first["blocks"])
    assert first["state"] == "serving" and first["moves"] == 0
    # Stop a server whose span the mover does not share: its blocks would be left bare,
    # so it hands them over first (one of the two servers of the doubled span takes
    # them, whichever's turn comes first), then leaves.
    leaver = next(n for n in SERVERS if tuple(swarm.status(n)["blocks"]) != doubled)
    bare = tuple(swarm.status(leaver)["blocks"])
    pair = [n for n in (*SERVERS, "mover") if tuple(swarm.status(n)["blocks"]) == doubled]
    began = time.monotonic()
    stopped = swarm.homes.cli(swarm.homes.home(leaver), "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert time.monotonic() - began < MOVE_TIMEOUT_S
    statuses = {name: swarm.status(name) for name in pair}
    movers = [name for name, status in statuses.items() if tuple(status["blocks"]) == bare]
    assert len(movers) == 1, statuses
    status = statuses[movers[0]]
    assert status["state"] == "serving"
    assert status["moves"] == status["hole_moves"] == 1
    assert status["span_reason"].startswith(f"moved from {doubled[0]}:{doubled[1]}: filling")
    result = swarm.chat(PARIS_PROMPT)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    # Both stay put once the swarm is whole again.
    time.sleep(3)
    assert sum(swarm.status(name)["moves"] for name in pair) == 1
    SERVERS_NOW.extend(n for n in (*SERVERS, "mover") if n != leaver)


def test_of_five_servers_with_room_that_see_one_hole_only_enough_move(swarm: Swarm) -> None:
    """Herding: five more servers of 10 blocks join (each where the swarm is weakest),
    then every server of one span leaves at once (`--now`: no hand-over). Each of the
    servers that could fill that hole sees it, yet one moves: 10 blocks need one."""
    names = [f"extra{i}" for i in range(5)]
    # One after another: started at once, they measure their speed on shared cores and
    # may land on unaligned spans, which the layout check below does not expect.
    for name in names:
        swarm.start(name, "--num-blocks", "10")
    servers = [*SERVERS_NOW, *names]
    spans = {name: tuple(swarm.status(name)["blocks"]) for name in servers}
    held = collections.Counter(spans.values())
    hole = min(sorted(held, reverse=True), key=held.__getitem__)
    leavers = [name for name in servers if spans[name] == hole]
    stayers = [name for name in servers if spans[name] != hole]
    # Those that can leave their span without leaving it bare: the ones that see a hole
    # they could fill.
    able = [name for name in stayers if held[spans[name]] >= 2]
    assert len(able) >= 5, spans
    before = {name: swarm.status(name)["hole_moves"] for name in stayers}

    def stop_now(name: str) -> subprocess.CompletedProcess[str]:
        return swarm.homes.cli(swarm.homes.home(name), "stop", "--now")

    with ThreadPoolExecutor(len(leavers)) as pool:
        results = list(pool.map(stop_now, leavers))
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(tuple(swarm.status(name)["blocks"]) == hole for name in able):
            break
        time.sleep(0.5)
    else:
        pytest.fail(f"nobody filled {hole}: {[swarm.status(n) for n in able]}")
    # Every later turn has come and gone: still only one mover.
    time.sleep(HERD_SETTLE_S)
    moves = {name: swarm.status(name)["hole_moves"] - before[name] for name in stayers}
    assert sum(moves.values()) == 1, moves
    after = collections.Counter(tuple(swarm.status(name)["blocks"]) for name in stayers)
    assert set(after) == {(0, 10), (10, 20), (20, 30)}, after
    SERVERS_NOW[:] = stayers


def test_pausing_the_only_server_of_a_span_hands_it_over_first(swarm: Swarm) -> None:
    spans = {name: tuple(swarm.status(name)["blocks"]) for name in SERVERS_NOW}
    held = collections.Counter(spans.values())
    alone = next(name for name in SERVERS_NOW if held[spans[name]] == 1)
    span = spans[alone]
    reply = swarm.control(alone).call(PAUSE, timeout_s=30)
    # Not paused yet: serving (LEAVING) until another server holds its blocks.
    assert reply.paused and reply.handing_over == [f"{span[0]}:{span[1]}"]
    deadline = time.monotonic() + MOVE_TIMEOUT_S
    while time.monotonic() < deadline and not swarm.status(alone)["is_paused"]:
        time.sleep(0.5)
    others = [swarm.status(name) for name in SERVERS_NOW if name != alone]
    assert sum(tuple(status["blocks"]) == span for status in others) == 1, others
    status = swarm.status(alone)
    assert status["is_paused"] and not status["leaving"] and tuple(status["blocks"]) == span
    # A resume serves at once: the blocks stayed loaded.
    assert swarm.control(alone).call(RESUME, timeout_s=30).paused is False
    assert not swarm.status(alone)["is_paused"]
