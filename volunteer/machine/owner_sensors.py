"""What the owner's rules look at (`volunteer.scheduler.owner_rules`): the battery, the
user's last input, the CPU the rest of the machine uses, and the RAM the daemon holds.

Each reading is what this platform offers, or None with the reason, never a guess:
- battery: psutil (no battery found: None, and the machine counts as plugged in);
- user activity: logind's idle hint of this user's graphical session (`loginctl`), else
  X11's idle time (`xprintidle`) where a display is set; macOS's HID idle time (`ioreg`);
  Windows' last input (`GetLastInputInfo`). A console or SSH session, or a desktop that
  does not keep logind's hint, is "unknown";
- other programs' CPU: the machine's busy time less that of this process and its
  children, between two readings;
- the daemon's RAM: the resident memory of this process and its children, of the total.

For tests and drills, a JSON file (the `owner_sensors` setting) may stand in for any of
them: {"now": "2026-01-01T23:30:00", "on_battery": true, "idle_s": 12.0,
"other_cpu_percent": 80, "own_ram_percent": 60}; the keys it holds replace those
readings, the others are measured. It is read again at every reading, so a test changes
the machine by rewriting it.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as dt
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from volunteer.scheduler.owner_rules import OwnerRules, Readings

logger = logging.getLogger(__name__)

TOOL_TIMEOUT_S = 5.0
_HID_IDLE = re.compile(r'"HIDIdleTime"\s*=\s*(\d+)')


class OwnerSensors:
    """Readings for the owner's rules, one `read` at a time (the CPU share is measured
    between two reads)."""

    def __init__(self, stand_in: Path | None = None) -> None:
        self.stand_in = stand_in
        self.idle_source = "not read yet"
        self._process = psutil.Process()
        self._last_cpu: tuple[float, float, float] | None = None

    def read(self, rules: OwnerRules | None = None) -> Readings:
        """What `rules` look at now (everything without rules); what no rule asks for is
        left unread, None. Blocks for at most a few seconds: call it off the event loop."""
        given = self._stand_in()
        wants_idle = rules is None or rules.needs_activity
        wants_ram = rules is None or rules.ram_cap_percent(None) is not None
        wants_cpu = rules is None or rules.pause_when_other_cpu_percent is not None
        wants_battery = rules is None or not rules.run_on_battery
        if "idle_s" in given:
            idle_s = given["idle_s"]
        elif wants_idle:
            idle_s, self.idle_source = user_idle_s()
        else:
            idle_s, self.idle_source = None, "not read (no rule asks for it)"
        if "other_cpu_percent" in given:
            other_cpu = given["other_cpu_percent"]
        else:
            other_cpu = self._other_cpu_percent() if wants_cpu else None
            if not wants_cpu:
                self._last_cpu = None  # a later baseline starts afresh
        return Readings(
            now=dt.datetime.fromisoformat(given["now"]) if "now" in given else dt.datetime.now(),
            on_battery=(
                given["on_battery"]
                if "on_battery" in given
                else (on_battery() if wants_battery else None)
            ),
            idle_s=idle_s,
            other_cpu_percent=other_cpu,
            own_ram_percent=(
                given["own_ram_percent"]
                if "own_ram_percent" in given
                else (self._own_ram_percent() if wants_ram else None)
            ),
        )

    def _stand_in(self) -> dict[str, Any]:
        if self.stand_in is None:
            return {}
        try:
            given = json.loads(self.stand_in.read_text())
            if not isinstance(given, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            logger.warning("ignoring the owner_sensors file %s: %s", self.stand_in, exc)
            return {}
        if "idle_s" in given:
            self.idle_source = f"the owner_sensors file {self.stand_in}"
        return given

    def _other_cpu_percent(self) -> float | None:
        """Since the last read; None at the first."""
        now = time.monotonic()
        busy = _machine_busy_s()
        ours = tree_cpu_s(self._process)
        last, self._last_cpu = self._last_cpu, (now, busy, ours)
        if last is None or busy is None:
            return None
        elapsed = (now - last[0]) * (psutil.cpu_count() or 1)
        if elapsed <= 0:
            return None
        others = (busy - last[1]) - (ours - last[2])
        return max(0.0, min(100.0, 100.0 * others / elapsed))

    def _own_ram_percent(self) -> float | None:
        try:
            total = psutil.virtual_memory().total
        except (OSError, RuntimeError):
            return None
        return 100.0 * tree_rss_bytes(self._process) / total if total else None


def on_battery() -> bool | None:
    """True on battery, False plugged in; None where no battery is found."""
    try:
        battery = psutil.sensors_battery()
    except (AttributeError, NotImplementedError, OSError):
        return None
    if battery is None or battery.power_plugged is None:
        return None
    return not battery.power_plugged


def user_idle_s() -> tuple[float | None, str]:
    """Seconds since the user's last input, and where that came from (or why unknown)."""
    if sys.platform == "win32":
        return _windows_idle_s()
    if sys.platform == "darwin":
        return _macos_idle_s()
    seconds = _logind_idle_s()
    if seconds is not None:
        return seconds, "logind's idle hint"
    if os.environ.get("DISPLAY") and shutil.which("xprintidle"):
        out = _tool(["xprintidle"])
        if out is not None and out.strip().isdigit():
            return int(out.strip()) / 1000, "X11 (xprintidle)"
    return None, "unknown: no graphical session keeps an idle time here"


def _logind_idle_s() -> float | None:
    """From this user's graphical session: logind keeps IdleHint and, since when,
    IdleSinceHint (microseconds of wall-clock time)."""
    sessions = _tool(["loginctl", "list-sessions", "--no-legend"])
    if sessions is None:
        return None
    uid = str(os.getuid())  # type: ignore[attr-defined,unused-ignore]
    for line in sessions.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[1] != uid:
            continue
        shown = _tool(
            ["loginctl", "show-session", fields[0], "-p", "Type", "-p", "IdleHint",
             "-p", "IdleSinceHint"]
        )  # fmt: skip
        if shown is None:
            continue
        props = dict(p.split("=", 1) for p in shown.splitlines() if "=" in p)
        if props.get("Type") not in ("x11", "wayland", "mir"):
            continue  # a console or SSH session keeps no idle time
        since = int(props.get("IdleSinceHint") or 0)
        if since == 0:
            continue  # a desktop that never set the hint: it says nothing either way
        if props.get("IdleHint") != "yes":
            return 0.0
        return max(0.0, time.time() - since / 1e6)
    return None


def _macos_idle_s() -> tuple[float | None, str]:
    out = _tool(["ioreg", "-c", "IOHIDSystem", "-d", "4"])
    match = _HID_IDLE.search(out or "")
    if match is None:
        return None, "unknown: ioreg gave no HIDIdleTime"
    return int(match.group(1)) / 1e9, "macOS (IOHIDSystem)"


def _windows_idle_s() -> tuple[float | None, str]:
    class LastInput(ctypes.Structure):
        _fields_ = [("cbSize", ctypes.c_uint), ("dwTime", ctypes.c_uint)]

    info = LastInput(ctypes.sizeof(LastInput), 0)
    user32 = getattr(ctypes, "windll", None)
    if user32 is None or not user32.user32.GetLastInputInfo(ctypes.byref(info)):
        return None, "unknown: GetLastInputInfo failed"
    ticks = user32.kernel32.GetTickCount()
    return ((ticks - info.dwTime) & 0xFFFFFFFF) / 1000, "Windows (GetLastInputInfo)"


def _machine_busy_s() -> float | None:
    try:
        times = psutil.cpu_times()
    except (OSError, RuntimeError):
        return None
    idle = times.idle + getattr(times, "iowait", 0.0)
    return sum(times) - idle - getattr(times, "guest", 0.0) - getattr(times, "guest_nice", 0.0)


def tree_cpu_s(process: psutil.Process) -> float:
    """CPU seconds of the process, its live children, and those it has reaped."""
    total = 0.0
    with contextlib.suppress(psutil.Error):
        times = process.cpu_times()
        total += times.children_user + times.children_system
    for each in [process, *_children(process)]:
        with contextlib.suppress(psutil.Error):
            times = each.cpu_times()
            total += times.user + times.system
    return total


def tree_rss_bytes(process: psutil.Process) -> int:
    """Resident memory of the process and its live children (pages they share are counted
    once for each: an upper bound, on the safe side of a cap)."""
    total = 0
    for each in [process, *_children(process)]:
        with contextlib.suppress(psutil.Error):
            total += each.memory_info().rss
    return total


def _children(process: psutil.Process) -> list[psutil.Process]:
    try:
        return process.children(recursive=True)
    except psutil.Error:
        return []


def _tool(argv: list[str]) -> str | None:
    try:
        result = subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout if result.returncode == 0 else None
