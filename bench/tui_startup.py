"""TUI responsiveness: process start to first frame, and keypress latency while a reply
streams.

1. First frame: `python -m volunteer tui` runs in a pseudo-terminal (120x40) with no
   daemon; the time from spawning it to the first output that holds the dashboard's tab
   title is the first-frame time (median of `--repeats`; target < 0.8 s). The same for a
   bare `python -c pass` is printed as the floor of this machine.
2. Keypress latency: a real daemon serving SmolLM2 on 127.0.0.1 (a temporary --home)
   and `volunteer tui` on it in the pseudo-terminal; while a 256-token reply streams
   into the chat, tab keys are sent every 0.2 s and the time from each key to the
   terminal receiving the new tab's text is measured (median and worst; target < 50 ms).

Prints a table, then one JSON line (`first_frame_s`, `python_floor_s`,
`keypress_ms_median`, `keypress_ms_max`).

    VOLUNTEER_CACHE_DIR=<cache with the default model> python bench/tui_startup.py
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import pty
import re
import select
import statistics
import struct
import subprocess
import sys
import tempfile
import termios
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIRST_FRAME_MARK = b"Dashboard"
ANSI_CODE = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]")
"""Colours and cursor moves, which split the text on screen into pieces."""
FRAME_TIMEOUT_S = 20.0
KEYS = ("1", "3", "2")
PRESSES = 15


def first_frame_s(command: list[str], env: dict[str, str], mark: bytes | None) -> float:
    """Seconds from spawning `command` in a 120x40 pty to output holding `mark` (or exit)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    began = time.perf_counter()
    process = subprocess.Popen(
        command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True
    )
    os.close(slave)
    seen = b""
    try:
        while time.perf_counter() - began < FRAME_TIMEOUT_S:
            ready, _, _ = select.select([master], [], [], 0.05)
            if ready:
                try:
                    seen += os.read(master, 65536)
                except OSError:  # the child closed the terminal
                    break
                if mark is not None and mark in seen:
                    return time.perf_counter() - began
            elif process.poll() is not None and mark is None:
                break
        if mark is None:
            return time.perf_counter() - began
        raise RuntimeError(f"no first frame within {FRAME_TIMEOUT_S:g} s: {seen[-400:]!r}")
    finally:
        with contextlib.suppress(OSError):
            os.write(master, b"q")
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        os.close(master)


class Terminal:
    """`volunteer tui` in a 120x40 pseudo-terminal: send keys, wait for text on screen."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, env=env, cwd=ROOT, close_fds=True
        )
        os.close(slave)
        self.seen = b""

    def send(self, keys: bytes) -> float:
        os.write(self.master, keys)
        return time.perf_counter()

    def wait_for(self, mark: bytes, timeout_s: float = FRAME_TIMEOUT_S) -> float:
        """Reads output until `mark` arrives (only output after the last call counts)."""
        self.seen = b""
        deadline = time.perf_counter() + timeout_s
        while time.perf_counter() < deadline:
            ready, _, _ = select.select([self.master], [], [], 0.01)
            if ready:
                self.seen += os.read(self.master, 65536)
                if mark in ANSI_CODE.sub(b"", self.seen):
                    return time.perf_counter()
        raise RuntimeError(f"{mark!r} did not show within {timeout_s:g} s: {self.seen[-300:]!r}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.master, b"q")
        try:
            self.process.wait(5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


# Each key (F3, F1, F2 as xterm sends them: they work while the prompt has focus), and
# text that only its screen draws.
SCREENS = ((b"\x1bOR", b"rtt ms"), (b"\x1bOP", b"requests"), (b"\x1bOQ", b"Max new tokens"))


def keypress_latencies(command: list[str], env: dict[str, str]) -> list[float]:
    """Key-to-screen times of tab switches while a long reply streams into the chat."""
    terminal = Terminal(command, env)
    try:
        terminal.wait_for(b"requests", timeout_s=60)  # the dashboard with a daemon
        terminal.send(b"2")
        terminal.wait_for(b"Max new tokens")
        # The chat tab focuses its prompt: type the question, send it, let the reply flow.
        time.sleep(0.5)
        terminal.send(b"Write a long story about a robot who learns to paint.\r")
        terminal.wait_for(b"\xe2\x80\xba Write a long story")  # the question, as sent
        time.sleep(3.0)  # the first reply loads the model's ends; then tokens flow
        latencies = []
        for index in range(PRESSES):
            key, mark = SCREENS[index % len(SCREENS)]
            sent = terminal.send(key)
            latencies.append(terminal.wait_for(mark) - sent)
            time.sleep(0.2)
        return latencies
    finally:
        terminal.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    figures: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="tui-bench-") as tmp:
        env = {k: v for k, v in os.environ.items() if k != "VOLUNTEER_HOME"}
        env.update(TERM="xterm-256color", COLUMNS="120", LINES="40")
        tui = [sys.executable, "-m", "volunteer", "--home", f"{tmp}/nobody", "tui"]
        frames = [first_frame_s(tui, env, FIRST_FRAME_MARK) for _ in range(args.repeats)]
        floor = [first_frame_s([sys.executable, "-c", "pass"], env, None) for _ in range(3)]
        figures["first_frame_s"] = round(statistics.median(frames), 3)
        figures["first_frame_s_all"] = [round(f, 3) for f in frames]
        figures["python_floor_s"] = round(statistics.median(floor), 3)

        home = Path(tmp) / "daemon"
        cli = [sys.executable, "-m", "volunteer", "--home", str(home)]
        started = subprocess.run(
            [*cli, "start", "--new-swarm"], env=env, cwd=ROOT, capture_output=True, text=True
        )
        if started.returncode != 0:
            raise SystemExit(f"starting the daemon failed: {started.stderr}")
        try:
            latencies = keypress_latencies([*cli, "tui"], env)
        finally:
            subprocess.run([*cli, "stop"], env=env, cwd=ROOT, capture_output=True)
    figures["keypress_ms_median"] = round(statistics.median(latencies) * 1000, 1)
    figures["keypress_ms_max"] = round(max(latencies) * 1000, 1)
    figures["keypresses"] = len(latencies)

    print(
        f"first frame of `volunteer tui`: {figures['first_frame_s']:.3f} s median "
        f"(runs {figures['first_frame_s_all']}); bare python: {figures['python_floor_s']:.3f} s"
    )
    print(
        f"keypress to screen while streaming: {figures['keypress_ms_median']:.1f} ms median, "
        f"{figures['keypress_ms_max']:.1f} ms worst over {len(latencies)} presses"
    )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
