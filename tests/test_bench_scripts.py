"""Every benchmark script starts as the README runs it (`python bench/NAME.py`): a
script's folder comes first on sys.path, where a file named like a package of ours
would hide that package. Files without a `__main__` guard are data the scripts share."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("volunteer", "tui", "scheduler", "models")
FILES = sorted((ROOT / "bench").glob("*.py"))
SCRIPTS = [path for path in FILES if 'if __name__ == "__main__":' in path.read_text()]


def test_no_file_is_named_like_a_package() -> None:
    assert SCRIPTS
    assert not [path.name for path in FILES if path.stem in PACKAGES]


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
