"""A real serving daemon under the owner's rules: each rule pauses it (OFFLINE in the swarm,
`status` saying which rule) and lets it resume; a session open at the pause finishes; a
real CPU-burning program pauses it; the volunteer's own pause is never ended by a rule.

The readings come from the `owner_sensors` stand-in file (battery, clock, idle time,
other programs' CPU and the daemon's share of the RAM are machine state a test cannot
set), except in the burner test, where the daemon measures the CPU itself.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.daemon.homes import ROOT, DaemonSwarm, Homes, wait_for
from tests.machine.test_owner_sensors import ONE_CORE, _burner
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import use_tcp
from volunteer.control.messages import PAUSE, RESUME, STATUS, SWARM
from volunteer.machine.atomic import write_file_atomic
from volunteer.paths import Paths

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

NIGHT = {"now": "2026-12-07T23:00:00", "on_battery": False, "idle_s": 3600.0}
"""Inside the schedule, plugged in, nobody at the keyboard."""
CALM = {**NIGHT, "other_cpu_percent": 0.0}
RULE_TIMEOUT_S = 30.0
"""A look every 2 s; an announce and the boot daemon's next read of the swarm after."""
COUNT_PROMPT = "Count from 1 to 300, separated by commas."
GRACE_S = 2
OTHER_CPU_LIMIT = 30


class Swarm(DaemonSwarm):
    def control(self, name: str) -> ControlClient:
        return ControlClient(Paths.resolve(home=self.homes.home(name), env=self.homes.env))

    def status(self, name: str = "server") -> dict[str, Any]:
        return self.control(name).call(STATUS, timeout_s=10).model_dump(mode="json")

    def record_state(self) -> str | None:
        """The server's state in the swarm's records, as the boot daemon reads them."""
        peer_id = self.started["server"]["peer_id"]
        described = self.control("boot").call(SWARM, timeout_s=30).model_dump(mode="json")
        states = [s["state"] for s in described["servers"] if s["peer_id"] == peer_id]
        return states[0] if states else None


@pytest.fixture(scope="module")
def sensors(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sensors") / "sensors.json"
    write_file_atomic(path, json.dumps(CALM).encode())
    return path


@pytest.fixture(scope="module")
def swarm(
    tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path, sensors: Path
) -> Iterator[Swarm]:
    homes = Homes(tmp_path_factory.mktemp("owner"))
    swarm = Swarm(homes, smollm2_folder, new_tokens="160", chat_timeout_s=240)
    rules = ["--owner-sensors", str(sensors), "--schedule", "22:00-07:00"]
    rules += ["--pause-while-user-active", "yes"]
    rules += ["--pause-when-other-cpu-percent", str(OTHER_CPU_LIMIT)]
    rules += ["--max-ram-percent-in-use", "60", "--max-ram-percent-idle", "90"]
    rules += ["--max-upload-mbps", "500"]  # far above a chat's needs: a count, no wait
    try:
        swarm.start("boot", "--num-blocks", "0")
        # The only server of its blocks: each pause first waits (briefly) for a hand-over.
        swarm.start("server", "--blocks", "0:30", "--leave-grace", str(GRACE_S), *rules)
        yield swarm
    finally:
        homes.reap()


def _wait(what: str, check: Callable[[], bool], timeout_s: float = RULE_TIMEOUT_S) -> None:
    wait_for(what, check, timeout_s)


def _set(sensors: Path, **readings: Any) -> None:
    # Atomically: a look that met a half-written file would read the real machine.
    write_file_atomic(sensors, json.dumps({**CALM, **readings}).encode())


def _is_serving(swarm: Swarm) -> bool:
    status = swarm.status()
    return status["state"] == "serving" and swarm.record_state() == "online"


@pytest.mark.parametrize(
    ("readings", "reason"),
    [
        ({"on_battery": True}, "on battery (run_on_battery is off)"),
        ({"now": "2026-12-07T12:00:00"}, "outside the schedule (22:00-07:00)"),
        ({"idle_s": 5.0}, "the user is active (input 0.1 min ago, under 3)"),
        ({"other_cpu_percent": 75.0}, "other programs use 75% of the CPU (over 30%)"),
        (
            {"own_ram_percent": 95.0},
            "the daemon holds 95% of the RAM, over the 90% allowed while the machine is "
            "idle; its sessions' caches go as they end",
        ),
    ],
    ids=["battery", "schedule", "user-active", "other-cpu", "ram"],
)
def test_each_rule_pauses_and_resumes_and_says_why(
    swarm: Swarm, sensors: Path, readings: dict[str, Any], reason: str
) -> None:
    _wait("serving with calm readings", lambda: _is_serving(swarm))
    _set(sensors, **readings)
    _wait(f"paused: {reason}", lambda: swarm.status()["error"] == f"paused: {reason}")
    status = swarm.status()
    assert status["state"] == "paused" and status["pause_reason"] == reason
    _wait("OFFLINE in the swarm's records", lambda: swarm.record_state() == "offline")
    _set(sensors)
    _wait("serving again once the rule lets go", lambda: _is_serving(swarm))
    assert swarm.status()["pause_reason"] is None


def test_a_session_open_at_the_pause_finishes(swarm: Swarm, sensors: Path) -> None:
    _wait("serving with calm readings", lambda: _is_serving(swarm))
    reference = swarm.chat("--verify", "off", COUNT_PROMPT)
    assert reference.returncode == 0, reference.stderr
    command = [sys.executable, "-m", "volunteer", "--home", str(swarm.homes.home("boot"))]
    command += ["chat", "--max-new-tokens", swarm.new_tokens, "--verify", "off", COUNT_PROMPT]
    with subprocess.Popen(
        command, cwd=ROOT, env=swarm.homes.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    ) as chat:  # fmt: skip
        _wait("the chat's session open", lambda: swarm.status()["open_sessions"] >= 1, 60)
        _set(sensors, on_battery=True)
        _wait("paused on battery", lambda: swarm.status()["state"] == "paused")
        assert chat.poll() is None, "the chat ended before the pause: too short a test"
        out, err = chat.communicate(timeout=240)
    assert chat.returncode == 0, err
    assert out == reference.stdout  # all of it, from the paused server
    # `status` says what the cap let through (the chat came over a local link, no upload).
    rules_row = swarm.status()["owner_rules"]
    assert re.search(r"upload capped at 500 Mbit/s: \d+\.\d MB sent through p2p", rules_row)
    _set(sensors)
    _wait("serving again", lambda: _is_serving(swarm))


def test_the_volunteers_pause_is_never_ended_by_a_rule(swarm: Swarm, sensors: Path) -> None:
    _wait("serving with calm readings", lambda: _is_serving(swarm))
    assert swarm.control("server").call(PAUSE, timeout_s=30).paused
    _set(sensors, on_battery=True)
    _wait("the rules seeing the battery", lambda: "on battery" in swarm.status()["owner_rules"])
    _set(sensors)
    _wait("the rules letting go", lambda: "no rule pauses" in swarm.status()["owner_rules"])
    time.sleep(8)  # longer than the calm looks a rule's pause waits before it resumes
    status = swarm.status()
    assert status["state"] == "paused" and status["pause_reason"] == "you"
    assert swarm.control("server").call(RESUME, timeout_s=30).paused is False
    _wait("serving after the volunteer's resume", lambda: _is_serving(swarm))


def test_a_resume_by_the_volunteer_beats_the_rule_until_it_lets_go(
    swarm: Swarm, sensors: Path
) -> None:
    _wait("serving with calm readings", lambda: _is_serving(swarm))
    _set(sensors, on_battery=True)
    _wait("paused on battery", lambda: swarm.status()["state"] == "paused")
    assert swarm.control("server").call(RESUME, timeout_s=30).paused is False
    time.sleep(5)  # the rule still holds, but the volunteer said resume
    assert swarm.status()["state"] == "serving"
    _set(sensors)
    time.sleep(5)  # the rule lets go...
    _set(sensors, on_battery=True)  # ...and holds again: it pauses again
    _wait("paused on battery again", lambda: swarm.status()["state"] == "paused")
    _set(sensors)
    _wait("serving again", lambda: _is_serving(swarm))


def test_a_real_cpu_burning_program_pauses_the_daemon(swarm: Swarm, sensors: Path) -> None:
    write_file_atomic(sensors, json.dumps(NIGHT).encode())  # others' CPU measured for real
    _wait("serving on a quiet machine", lambda: _is_serving(swarm))
    # Enough burning cores to pass the limit on any machine, one on two cores.
    burners = max(1, math.ceil(OTHER_CPU_LIMIT * 1.5 / ONE_CORE))
    with contextlib.ExitStack() as stack:
        for _ in range(burners):
            stack.enter_context(_burner())
        _wait(
            "paused by the burner",
            lambda: "other programs use" in (swarm.status()["pause_reason"] or ""),
        )
    _wait("serving once the burner is gone", lambda: _is_serving(swarm))
    assert "no rule pauses it" in swarm.status()["owner_rules"]
