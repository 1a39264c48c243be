"""Running real daemons for tests: `python -m volunteer --home DIR ...` subprocesses.

Each daemon runs a real hivemind DHT on 127.0.0.1. Every daemon a test starts is killed
(with its process group, p2pd included) by `Homes.reap` if it is still alive.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from volunteer.control.lifecycle import pid_file
from volunteer.paths import Paths

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 90


def wait_for(what: str, check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    """Polls `check` (a daemon's status, say) until it holds; fails the test naming `what`
    after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.5)
    pytest.fail(f"not within {timeout_s:.0f} s: {what}")


class Homes:
    """Creates daemon homes and remembers every daemon pid seen, to reap them."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.pids: set[int] = set()
        # Without the test runner's VOLUNTEER_* variables: the daemons see only our options.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
        self.env["VOLUNTEER_CACHE_DIR"] = str(root / "cache")
        # No validator role unless a test asks (`--validate-share`): its probes would be
        # work in the timings, CPU and memory other tests bound.
        self.env["VOLUNTEER_VALIDATE_SHARE"] = "0"
        # Float32 weights unless a test asks (`--dtype`): most compare with float32
        # references, and `auto` picks a form by timing this machine.
        self.env["VOLUNTEER_DTYPE"] = "fp32"
        self.env.update(env)

    def home(self, name: str) -> Path:
        return self.root / name

    def cli(self, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            [sys.executable, "-m", "volunteer", "--home", str(home), *args],
            cwd=ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT_S,
        )
        self.remember(home)
        return result

    def status(self, home: Path) -> dict[str, Any]:
        result = self.cli(home, "status", "--json")
        return json.loads(result.stdout)

    def remember(self, home: Path) -> int | None:
        paths = Paths.resolve(home=home, env=self.env)
        try:
            pid = json.loads(pid_file(paths).read_text())["pid"]
        except FileNotFoundError:
            return None
        self.pids.add(pid)
        return pid

    def reap(self) -> None:
        for pid in self.pids:
            # Each daemon leads its own session, so its process group holds p2pd too.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


class DaemonSwarm:
    """Daemons of one swarm, each in a home named after it: the first one started makes
    the swarm, the others join it through the first one's address."""

    def __init__(
        self,
        homes: Homes,
        model: Path,
        *,
        new_tokens: str,
        chat_timeout_s: float,
        daemon_flags: tuple[str, ...] = (),
    ) -> None:
        self.homes = homes
        self.model = model
        self.new_tokens = new_tokens
        self.chat_timeout_s = chat_timeout_s
        self.daemon_flags = daemon_flags
        """Given to every daemon's `start`, before its own flags."""
        self.join = ""
        self.started: dict[str, dict[str, Any]] = {}
        """Each daemon's status (`volunteer status --json`) once it had started."""

    def start(self, name: str, *flags: str) -> Path:
        home = self.homes.home(name)
        home.mkdir(exist_ok=True)
        where = ["--join", self.join] if self.join else ["--new-swarm"]
        # One torch thread each: several daemons share this machine's cores.
        common = ["--model", str(self.model), "--threads", "1", *self.daemon_flags]
        started = self.homes.cli(home, "start", *common, *where, *flags)
        assert started.returncode == 0, started.stderr
        self.started[name] = self.homes.status(home)
        if not self.join:
            self.join = self.started[name]["multiaddrs"][0]
        return home

    def chat(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`volunteer chat` through the bootstrap daemon (the one named "boot"), or as
        `args` say."""
        command = [sys.executable, "-m", "volunteer", "--home", str(self.homes.home("boot"))]
        command += ["chat", "--max-new-tokens", self.new_tokens, *args]
        return subprocess.run(
            command,
            cwd=ROOT,
            env=self.homes.env,
            capture_output=True,
            text=True,
            timeout=self.chat_timeout_s,
        )


@contextlib.contextmanager
def one_daemon(root: Path, model: Path) -> Iterator[tuple[Homes, Path]]:
    """A daemon of a new swarm of its own serving `model` (one torch thread), in a home
    under `root`; killed at exit."""
    homes = Homes(root)
    home = homes.home("one")
    home.mkdir()
    try:
        flags = ("--model", str(model), "--threads", "1", "--new-swarm")
        started = homes.cli(home, "start", *flags)
        assert started.returncode == 0, started.stderr
        yield homes, home
    finally:
        homes.reap()
