"""What the TUI needs of the daemon, and the real thing: the daemon's control API.

Every method blocks (the app calls them from worker threads, never from the event loop).
Tests of rendering and key bindings may pass another object with these methods; tests
against a real daemon pass `ControlDaemonClient`.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from volunteer.tui.render import setting_label

from volunteer.control import lifecycle
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import ControlError, DaemonNotRunningError
from volunteer.control.messages import (
    ADAPTERS,
    CHAT,
    FINETUNE_START,
    FINETUNE_STATUS,
    FINETUNE_STOP,
    LEADERBOARD,
    PAUSE,
    PEERS,
    RELOAD,
    RESUME,
    STATUS,
    SWARM,
    AdaptersReply,
    ChatNotice,
    ChatStats,
    ChatText,
    FinetuneJob,
    LeaderboardReply,
    PeersReply,
    StatusReply,
    SwarmParams,
    SwarmReply,
)
from volunteer.control.replies import describe_reload
from volunteer.paths import Paths
from volunteer.settings import SPECS, Settings, read_config, save_config

STATUS_TIMEOUT_S = 2.0
SWARM_TIMEOUT_S = 20.0
LEADERBOARD_TIMEOUT_S = 10.0
TOKEN_WAIT_S = 300.0
"""The first reply loads the model's ends; one with an adapter loads it too."""
FINETUNE_TIMEOUT_S = 30.0
START_TIMEOUT_S = 180.0
RELOAD_TIMEOUT_S = 30.0
"""A reload re-announces the public name in the DHT (10 s per try at most)."""


class DaemonClient(Protocol):
    log_file: Path | None
    """The daemon's log, tailed by the log panel (None: no log to show)."""

    def status(self) -> StatusReply | None:
        """The daemon's status; None when none runs."""
        ...

    def swarm(self) -> SwarmReply:
        """Who serves which block of the daemon's model, with round trips."""
        ...

    def peers(self) -> PeersReply:
        """The peers the daemon knows, with what its checks found of each."""
        ...

    def leaderboard(self) -> LeaderboardReply:
        """The servers ranked by the credit the daemon audited, and its own credit per day."""
        ...

    def chat(self, params: dict[str, Any]) -> Iterator[ChatText | ChatNotice | ChatStats]:
        """The daemon's chat stream (params: a `ChatRequest`'s fields, which the daemon
        checks and names the wrong one of): the reply's text pieces (and notices), then
        its stats."""
        ...

    def finetune_start(self, params: dict[str, Any]) -> FinetuneJob:
        """Starts a fine-tuning job in the daemon (params: a `FinetuneRequest`'s fields,
        which the daemon checks); raises naming what is wrong, or the job that runs."""
        ...

    def finetune_status(self) -> FinetuneJob:
        """The daemon's current or last fine-tuning job, with its loss and speed series."""
        ...

    def finetune_stop(self) -> FinetuneJob:
        """Asks the running job to stop after its step (it saves a checkpoint)."""
        ...

    def adapters(self) -> AdaptersReply:
        """The adapters the daemon keeps (what chat may answer with)."""
        ...

    def start(self) -> str:
        """Starts a daemon with the configured settings; returns what it said."""
        ...

    def stop(self) -> str:
        """Stops the daemon; returns what happened."""
        ...

    def restart(self) -> str:
        """Stops the daemon (if one runs) and starts it with the saved settings."""
        ...

    def set_paused(self, is_paused: bool) -> str:
        """Pauses the daemon's serving (new work goes elsewhere) or resumes it."""
        ...

    def read_config(self) -> dict[str, str]:
        """The editable settings as `config.toml` has them (text; empty: the default)."""
        ...

    def save_config(self, edits: dict[str, str]) -> str:
        """Checks and writes edits, and has a running daemon take them on; returns what
        was applied and what waits for a restart. Raises `SettingsError` naming a bad
        value (then nothing is written)."""
        ...


class ControlDaemonClient:
    """`DaemonClient` over the control socket of the daemon of `paths` (one `--home`)."""

    def __init__(self, paths: Paths, *, home: Path | None = None) -> None:
        self._paths = paths
        self._home = home
        self.log_file: Path | None = paths.daemon_log

    def status(self) -> StatusReply | None:
        try:
            return ControlClient(self._paths).call(STATUS, timeout_s=STATUS_TIMEOUT_S)
        except DaemonNotRunningError:
            return None

    def swarm(self) -> SwarmReply:
        params = SwarmParams(is_ping=True)
        return ControlClient(self._paths).call(SWARM, params, timeout_s=SWARM_TIMEOUT_S)

    def peers(self) -> PeersReply:
        return ControlClient(self._paths).call(PEERS, timeout_s=SWARM_TIMEOUT_S)

    def leaderboard(self) -> LeaderboardReply:
        return ControlClient(self._paths).call(LEADERBOARD, timeout_s=LEADERBOARD_TIMEOUT_S)

    def chat(self, params: dict[str, Any]) -> Iterator[ChatText | ChatNotice | ChatStats]:
        client = ControlClient(self._paths)
        yield from client.call_stream(CHAT, params, timeout_s=TOKEN_WAIT_S)

    def finetune_start(self, params: dict[str, Any]) -> FinetuneJob:
        client = ControlClient(self._paths)
        return client.call(FINETUNE_START, params, timeout_s=FINETUNE_TIMEOUT_S)

    def finetune_status(self) -> FinetuneJob:
        return ControlClient(self._paths).call(FINETUNE_STATUS, timeout_s=STATUS_TIMEOUT_S)

    def finetune_stop(self) -> FinetuneJob:
        return ControlClient(self._paths).call(FINETUNE_STOP, timeout_s=FINETUNE_TIMEOUT_S)

    def adapters(self) -> AdaptersReply:
        return ControlClient(self._paths).call(ADAPTERS, timeout_s=LEADERBOARD_TIMEOUT_S)

    def start(self) -> str:
        # The CLI, so the daemon gets exactly the settings `volunteer start` would give it.
        home = ["--home", str(self._home)] if self._home else []
        command = [sys.executable, "-m", "volunteer", *home, "start"]
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=START_TIMEOUT_S, check=False
        )
        said = (done.stdout + done.stderr).strip().splitlines()
        return said[-1] if said else f"volunteer start exited with {done.returncode}"

    def stop(self) -> str:
        result = lifecycle.stop(self._paths)
        if result.outcome == "not_running":
            return "no daemon was running"
        return f"daemon {result.outcome} (pid {result.pid})"

    def set_paused(self, is_paused: bool) -> str:
        reply = ControlClient(self._paths).call(PAUSE if is_paused else RESUME, timeout_s=20.0)
        if reply.handing_over:
            return f"pausing once blocks {', '.join(reply.handing_over)} have another server"
        return "paused: new sessions go to other servers" if is_paused else "resumed serving"

    def restart(self) -> str:
        stopped = self.stop()
        return f"{stopped}; {self.start()}"

    def read_config(self) -> dict[str, str]:
        return config_as_text(read_config(self._paths))

    def save_config(self, edits: dict[str, str]) -> str:
        save_config(self._paths, edits)
        try:
            outcome = ControlClient(self._paths).call(RELOAD, timeout_s=RELOAD_TIMEOUT_S)
        except DaemonNotRunningError:
            return "saved to config.toml; the daemon uses it when it starts"
        except ControlError as exc:  # saved all the same: a restart applies it
            return (
                f"saved to config.toml; the daemon did not take it on ({exc}); ctrl+r restarts it"
            )
        said = describe_reload(outcome, label=setting_label, restart_how=" (ctrl+r)")
        return f"saved to config.toml; {said}"


def config_as_text(settings: Settings) -> dict[str, str]:
    """The editable settings as form text: "" where the default applies."""
    texts = {}
    for spec in SPECS:
        if not spec.is_editable:
            continue
        value = getattr(settings, spec.name)
        if value == spec.default or value is None:
            texts[spec.name] = ""
        elif isinstance(value, bool):
            texts[spec.name] = "yes" if value else "no"
        else:
            texts[spec.name] = f"{value:g}" if isinstance(value, float) else str(value)
    return texts
