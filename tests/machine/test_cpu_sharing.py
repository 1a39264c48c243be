"""The OpenMP wait policy is set for swarm processes, before torch loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

CHECK = """
import json, os, sys
from volunteer.machine.cpu_sharing import sleep_idle_threads
applied = sleep_idle_threads()
import torch  # noqa: F401
policy = {k: os.environ.get(k) for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
print(json.dumps({"applied": applied, **policy}))
"""


def _run(code: str, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    result = subprocess.run(
        [sys.executable, "-c", code],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    return json.loads(result.stdout)


def test_idle_threads_sleep_in_a_fresh_process() -> None:
    assert _run(CHECK) == {"applied": True, "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def test_the_users_choice_wins() -> None:
    chosen = _run(CHECK, OMP_WAIT_POLICY="ACTIVE")
    assert chosen == {"applied": True, "OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": None}


def test_too_late_once_torch_is_loaded() -> None:
    late = _run("import torch\n" + CHECK)
    assert late == {"applied": False, "OMP_WAIT_POLICY": None, "GOMP_SPINCOUNT": None}
