"""Layer rules: each layer imports only what ARCHITECTURE.md allows (checked in a fresh
interpreter by looking at sys.modules after importing every module of the layer)."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> list[str]:
    found = [package]
    for info in pkgutil.walk_packages([str(ROOT / package)], prefix=f"{package}."):
        # __main__ runs the program when imported; that is its job.
        if not info.name.endswith(".__main__"):
            found.append(info.name)
    return sorted(found)


def _loaded_after_import(modules: list[str]) -> set[str]:
    code = (
        "import importlib, json, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return {name.split(".")[0] for name in json.loads(out.stdout)}


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("scheduler", {"torch", "hivemind", "textual", "models", "volunteer", "tui"}),
        ("models", {"hivemind", "textual", "volunteer", "tui", "scheduler", "transformers"}),
        ("tui", {"torch", "hivemind", "transformers"}),
        ("volunteer", {"textual", "tui", "transformers"}),
    ],
)
def test_layer_imports_stay_inside_their_rules(package: str, forbidden: set[str]) -> None:
    loaded = _loaded_after_import(_modules(package))
    assert not loaded & forbidden, f"{package} pulled in {sorted(loaded & forbidden)}"


def test_the_check_sees_a_real_import() -> None:
    # The probe must notice torch when a module really imports it.
    assert "torch" in _loaded_after_import(["models.block"])
