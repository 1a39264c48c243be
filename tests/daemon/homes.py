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
from pathlib import Path
from typing import Any

from volunteer.control.lifecycle import pid_file
from volunteer.paths import Paths

ROOT = Path(__file__).resolve().parents[2]
CLI_TIMEOUT_S = 90


class Homes:
    """Creates daemon homes and remembers every daemon pid seen, to reap them."""

    def __init__(self, root: Path, **env: str) -> None:
        self.root = root
        self.pids: set[int] = set()
        # Without the test runner's VOLUNTEER_* variables: the daemons see only our options.
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("VOLUNTEER_")}
        self.env["VOLUNTEER_CACHE_DIR"] = str(root / "cache")
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
