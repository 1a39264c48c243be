"""Every benchmark script starts as the README runs it (`python bench/NAME.py`): a
script's folder comes first on sys.path, where a file named like a package of ours
would hide that package."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("volunteer", "tui", "scheduler", "models")
SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


def test_no_script_is_named_like_a_package() -> None:
    assert SCRIPTS
    assert not [script.name for script in SCRIPTS if script.stem in PACKAGES]


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda script: script.name)
def test_each_script_imports_and_prints_its_help(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "usage:" in done.stdout
