"""Importing hivemind without the part of scipy it never needs here.

hivemind's package `__init__` imports every subpackage, and its averager's load
balancing runs `import scipy.optimize` at import time: tens of MiB resident in every
daemon, and start-up time, for a linear program that only hivemind's decentralized
averaging solves, which a volunteer daemon or swarm client never runs.
`import_hivemind()` imports hivemind with a placeholder standing in for `scipy.optimize`
and takes it out right after, so any later `scipy.optimize` use (ours, or that hivemind
function's, via scipy's lazy submodule attribute) loads the real module then.
"""

from __future__ import annotations

import sys
import types

_MODULE = "scipy.optimize"


def import_hivemind() -> bool:
    """Imports hivemind lean; call it at a process's entry, before anything imports
    hivemind. Returns False (and changes nothing) when hivemind or scipy.optimize is
    already imported."""
    if "hivemind" in sys.modules or _MODULE in sys.modules:
        return False
    placeholder = types.ModuleType(_MODULE, "stands in while hivemind imports")
    sys.modules[_MODULE] = placeholder
    try:
        import hivemind  # noqa: F401
    finally:
        if sys.modules.get(_MODULE) is placeholder:
            del sys.modules[_MODULE]
    return True
