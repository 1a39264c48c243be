"""The layout's promises: a small root, small files, and one import root that a script's
own folders cannot shadow."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
PRODUCT_FOLDERS = ("volunteer", "installers", "models", "scheduler", "tui")
MAX_ROOT_MODULES = 6
MAX_PRODUCT_LINES = 450


def test_the_volunteer_root_holds_only_the_core_modules() -> None:
    modules = sorted(p.name for p in (ROOT / "volunteer").glob("*.py"))
    assert len(modules) <= MAX_ROOT_MODULES, modules


def test_no_product_file_is_over_the_size_limit() -> None:
    too_long = {
        str(path.relative_to(ROOT)): lines
        for folder in PRODUCT_FOLDERS
        for path in (ROOT / folder).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_PRODUCT_LINES
    }
    assert too_long == {}


def test_pyproject_lists_every_package_folder() -> None:
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapped = setuptools["package-dir"]
    listed = set(setuptools["packages"])
    on_disk = set()
    for folder in PRODUCT_FOLDERS:
        base = "volunteer" if folder == "volunteer" else f"volunteer.{folder}"
        assert folder == "volunteer" or mapped[base] == folder
        for init in (ROOT / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(ROOT / folder).parts
            on_disk.add(".".join([base, *parts]))
    assert listed == on_disk


def test_a_scripts_own_folders_cannot_shadow_our_packages(tmp_path: Path) -> None:
    # A user's script beside folders named like our layout's (models/, scheduler/, tui/)
    # still gets our packages, and our generic names are not installed at the top level.
    for name in ("models", "scheduler", "tui"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text("raise ImportError('shadowed')\n")
    code = (
        "import importlib.util, sys\n"
        "sys.path.remove(sys.path[0])\n"  # as an installed program sees it: no script dir
        "print([importlib.util.find_spec(n) is None for n in ('models', 'scheduler', 'tui')])\n"
        "sys.path.insert(0, '.')\n"  # a script in this folder: its folders come first
        "import volunteer.models.config, volunteer.scheduler.capacity, volunteer.tui.render\n"
        "print(volunteer.models.config.__file__)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    missing, models_file = out.stdout.splitlines()
    assert missing == "[True, True, True]"
    assert Path(models_file).is_relative_to(ROOT / "models")
