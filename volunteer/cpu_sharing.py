"""How torch's CPU threads behave when a process shares the machine's cores.

A swarm process (a daemon, or a client whose blocks run elsewhere) computes in short
bursts and then waits on the network while another process on the same cores computes:
the next server in the route, p2pd, the client's LM head. libgomp's default keeps idle
OpenMP workers spinning for about 3 ms after each burst, taking the core from whoever
computes next; on a 2-core machine that cost a loopback swarm about a fifth of its speed.
Letting idle workers sleep also keeps an idle server at no CPU. A lone process running
the whole model (`chat --local`) keeps the default: there, spinning saves wake-ups.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

SPIN_COUNT = "10000"
"""libgomp's spins before sleeping (about 0.1 ms here): long enough to keep the workers
hot between the back-to-back ops of one step, short enough to free the core after it."""


def sleeping_threads_env(environ: Mapping[str, str]) -> dict[str, str]:
    """The variables to add to `environ` so that idle OpenMP workers sleep; none when
    the user chose a wait policy."""
    if "OMP_WAIT_POLICY" in environ:
        return {}
    added = {"OMP_WAIT_POLICY": "PASSIVE"}
    if "GOMP_SPINCOUNT" not in environ:
        added["GOMP_SPINCOUNT"] = SPIN_COUNT
    return added


def sleep_idle_threads() -> bool:
    """Makes idle OpenMP workers of this process sleep (see `sleeping_threads_env`).

    libgomp reads the policy once, when torch loads it; returns False (and changes
    nothing) when torch is already imported, as in a test that runs the daemon in-process.
    """
    if "torch" in sys.modules:
        return False
    os.environ.update(sleeping_threads_env(os.environ))
    return True
