"""hivemind imported without scipy.optimize, which still works for whoever needs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import json, sys
from volunteer.machine.lean_imports import import_hivemind
first = import_hivemind()
again = import_hivemind()
loaded_after_hivemind = "scipy.optimize" in sys.modules
from hivemind.p2p import P2P
import hivemind.averaging.load_balancing as balancing
import scipy.optimize
print(json.dumps({
    "first": first, "again": again, "loaded": loaded_after_hivemind,
    "real": hasattr(scipy.optimize, "linprog"),
    "hivemind_sees_it": balancing.scipy.optimize.linprog is scipy.optimize.linprog,
}))
"""


def _probe(code: str) -> dict[str, bool]:
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(done.stdout)


def test_hivemind_imports_without_scipy_optimize_which_loads_when_used() -> None:
    seen = _probe(PROBE)
    assert seen == {
        "first": True, "again": False, "loaded": False, "real": True, "hivemind_sees_it": True,
    }  # fmt: skip


def test_nothing_changes_when_scipy_optimize_is_already_in() -> None:
    seen = _probe("import scipy.optimize\n" + PROBE)
    assert seen["first"] is False and seen["loaded"] is True and seen["real"] is True
