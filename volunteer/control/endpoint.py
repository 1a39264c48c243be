"""Where the daemon's control API listens, how a message is framed, and what goes wrong.

Newline-delimited JSON over a Unix socket (`control.sock` in the runtime dir, mode 0600,
created inside a 0700 folder so nobody else can reach it even before the chmod). Where
there are no Unix sockets (Windows) the daemon listens on loopback TCP instead and every
request must carry the token from `control.json`, a 0600 file in the runtime dir.

One line per message::

    request   {"method": "status", "params": {}}              (+ "token" over TCP)
    response  {"ok": true, "result": ...}  or  {"ok": false, "error": "..."}
    stream    {"ok": true, "result": ..., "more": true} ...  then  {"ok": true, "done": true}

Errors::

    VolunteerError
     └── ControlError: the daemon answered a request with an error
          ├── DaemonNotRunningError: nothing listens on the endpoint
          ├── ControlTimeoutError: the daemon did not answer in time
          └── MalformedReplyError: the answer is not JSON, or not the method's reply
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from volunteer.errors import VolunteerError
from volunteer.paths import Paths

MAX_MESSAGE_BYTES = 1 << 20
"""Longest accepted line, either way; a longer request is refused."""
SOCKET_NAME = "control.sock"
TCP_INFO_NAME = "control.json"
_MAX_UNIX_PATH_BYTES = 100  # sun_path holds 104 (macOS) to 108 (Linux) bytes


class ControlError(VolunteerError):
    """The daemon answered a control request with an error."""


class DaemonNotRunningError(ControlError):
    """Nothing listens on the control endpoint."""


class ControlTimeoutError(ControlError):
    """The daemon did not answer in time."""


class MalformedReplyError(ControlError):
    """The daemon's answer is not JSON, or not the reply the method promises."""


def use_tcp() -> bool:
    """Whether this system needs the loopback TCP fallback (no Unix sockets)."""
    return os.name == "nt" or not hasattr(socket, "AF_UNIX")


def socket_path(paths: Paths) -> Path:
    """Where the control socket lives for this instance.

    A deep `--home` can exceed the socket path limit; then the socket moves to a short,
    private folder in the temp dir, named after a hash of the runtime dir so each home
    keeps its own.
    """
    path = paths.runtime_dir / SOCKET_NAME
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH_BYTES:
        return path
    digest = hashlib.sha256(os.fsencode(paths.runtime_dir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"volunteer-{os.getuid()}-{digest}" / SOCKET_NAME


def tcp_info_path(paths: Paths) -> Path:
    """The loopback port and token of the instance's daemon (where TCP is used)."""
    return paths.runtime_dir / TCP_INFO_NAME


def private_dir(path: Path) -> Path:
    """Creates `path` (and parents) and makes it 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.name == "posix":
        if path.stat().st_uid != os.getuid():
            raise ControlError(f"{path} belongs to another user; refusing to use it")
        path.chmod(0o700)
    return path


def encode(message: Mapping[str, Any]) -> bytes:
    """One message as its line."""
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def error_message(text: str) -> dict[str, Any]:
    """The response saying a request failed."""
    return {"ok": False, "error": text}
