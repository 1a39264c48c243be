"""What the owner's rules read: the stand-in file of tests and drills, and a real measure of
the CPU other programs use (a CPU-burning process that is not ours), which the daemon's
own work never counts in, and the RAM the daemon holds, its children's included."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from volunteer.scheduler.owner_rules import OwnerRules

from volunteer.machine.owner_sensors import OwnerSensors, user_idle_s

BURN_S = 1.5
ONE_CORE = 100.0 / (psutil.cpu_count() or 1)
"""One busy core as a share of all the machine's CPUs."""
DETACHED_BURNER = (
    "import os, sys\n"
    "if os.fork():\n"  # the parent says who burns and leaves: the burner is nobody's child
    "    os._exit(0)\n"
    "print(os.getpid(), flush=True)\n"
    "os.close(1)\n"  # the launcher's reader sees the end of the output
    "os.close(2)\n"
    "while True:\n"
    "    pass\n"
)


@contextlib.contextmanager
def _burner() -> Iterator[int]:
    """A process burning one core that is not a child of this one (reparented)."""
    launcher = subprocess.run(
        [sys.executable, "-c", DETACHED_BURNER], capture_output=True, text=True, timeout=30
    )
    pid = int(launcher.stdout.split()[0])
    try:
        assert pid not in {p.pid for p in psutil.Process().children(recursive=True)}
        yield pid
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _other_cpu_while(action) -> float:
    sensors = OwnerSensors()
    assert sensors.read().other_cpu_percent is None  # the first read sets the baseline
    action()
    reading = sensors.read().other_cpu_percent
    assert reading is not None
    return reading


def _idle() -> None:
    time.sleep(BURN_S)


def _burn_here() -> None:
    end = time.monotonic() + BURN_S
    while time.monotonic() < end:
        pass


def test_a_program_burning_a_core_counts_as_other_cpu() -> None:
    quiet = _other_cpu_while(_idle)  # what else runs on this machine now
    with _burner():
        busy = _other_cpu_while(_idle)
    assert busy >= quiet + 0.6 * ONE_CORE, f"{busy:.0f}% with a core burning, {quiet:.0f}% before"


def test_the_daemons_own_work_is_not_other_cpu() -> None:
    quiet = _other_cpu_while(_idle)
    ours = _other_cpu_while(_burn_here)
    margin = max(0.5 * ONE_CORE, 5.0)  # half a core, or the noise of a many-core machine
    assert ours < quiet + margin, f"{ours:.0f}% while only we burned, {quiet:.0f}% before"


def test_a_stand_in_file_replaces_what_it_names(tmp_path: Path) -> None:
    path = tmp_path / "sensors.json"
    path.write_text(json.dumps({"now": "2026-01-01T23:30:00", "on_battery": True, "idle_s": 12}))
    sensors = OwnerSensors(path)
    reading = sensors.read()
    assert (reading.now.hour, reading.now.minute) == (23, 30)
    assert reading.on_battery is True and reading.idle_s == 12
    assert "owner_sensors file" in sensors.idle_source
    path.write_text(json.dumps({"other_cpu_percent": 80}))  # read again at every look
    again = sensors.read()
    assert again.other_cpu_percent == 80
    assert (again.idle_s is None) == (user_idle_s()[0] is None)  # measured again


def test_a_broken_stand_in_file_is_ignored_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "sensors.json"
    path.write_text("{not json")
    with caplog.at_level(logging.WARNING):
        reading = OwnerSensors(path).read()
    assert "ignoring the owner_sensors file" in caplog.text
    assert (reading.idle_s is None) == (user_idle_s()[0] is None)


def test_without_a_graphical_session_user_activity_is_unknown_not_guessed() -> None:
    """This machine (CI, a server) has no desktop session: the reading says so."""
    seconds, source = user_idle_s()
    if seconds is not None:
        pytest.skip(f"this machine has a source of user activity: {source}")
    assert source.startswith("unknown")


HOLD_MIB = 300
CHILD_HOLDING = (
    "import sys\n"
    f"held = bytearray({HOLD_MIB} << 20)\n"  # zeroed pages are touched: resident
    "for i in range(0, len(held), 4096):\n"
    "    held[i] = 1\n"
    "print('ready', flush=True)\n"
    "sys.stdin.read()\n"
)


def test_the_ram_a_child_of_the_daemon_holds_counts_as_the_daemons() -> None:
    sensors = OwnerSensors()
    capped = OwnerRules(max_ram_percent_in_use=50)
    before = sensors.read(capped).own_ram_percent
    assert before is not None and before > 0
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD_HOLDING],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        holding = sensors.read(capped).own_ram_percent
    finally:
        child.communicate("", timeout=30)
    assert holding is not None
    held_percent = 100 * (HOLD_MIB << 20) / psutil.virtual_memory().total
    assert holding >= before + 0.9 * held_percent, (before, holding, held_percent)
    assert sensors.read(OwnerRules()).own_ram_percent is None  # no cap: not read
