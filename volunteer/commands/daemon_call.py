"""Asking the local daemon from a command that has nothing to say without one."""

from __future__ import annotations

import json
from typing import Any

from volunteer.control.client import ControlClient
from volunteer.control.endpoint import DaemonNotRunningError
from volunteer.control.messages import Method
from volunteer.errors import VolunteerError
from volunteer.paths import Paths


def ask_daemon(paths: Paths, method: Method[Any, Any], timeout_s: float, params: Any = None) -> Any:
    """The daemon's reply to `method` (with `params`, or none).

    Raises:
        VolunteerError: no daemon runs here (it says how to start one).
    """
    try:
        return ControlClient(paths).call(method, params, timeout_s=timeout_s)
    except DaemonNotRunningError:
        raise VolunteerError(
            "no daemon is running here: start one with `volunteer start`"
        ) from None


def print_json(reply: Any) -> None:
    print(json.dumps(reply.model_dump(mode="json")))
