"""Layer rules: each layer imports only what ARCHITECTURE.md and its package's docstring
allow.

Two checks, since each misses what the other sees: every import statement in a layer's
source, at any depth (a function-level import runs only when called), is read from the
syntax tree; and a fresh interpreter imports every module of the layer and reports
which third-party packages came in with them (an allowed module may pull them in).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {
    "volunteer.installers": "installers",
    "volunteer.models": "models",
    "volunteer.scheduler": "scheduler",
    "volunteer.tui": "tui",
}
"""Packages installed under `volunteer.` from the layout's top-level folders (pyproject)."""

OURS = (
    "volunteer.api",
    "volunteer.chat",
    "volunteer.client",
    "volunteer.commands",
    "volunteer.control",
    "volunteer.daemon",
    "volunteer.finetune",
    "volunteer.installers",
    "volunteer.machine",
    "volunteer.model_cache",
    "volunteer.models",
    "volunteer.scheduler",
    "volunteer.server",
    "volunteer.swarm",
    "volunteer.transport",
    "volunteer.training",
    "volunteer.trust",
    "volunteer.tui",
)
CORE = (
    "volunteer",
    "volunteer.errors",
    "volunteer.faults",
    "volunteer.paths",
    "volunteer.settings",
)
"""The root modules any layer may use (cli and __main__ are the program, not a library)."""

ALLOWED: dict[str, tuple[str, ...]] = {
    "volunteer.scheduler": (),
    "volunteer.models": (),
    "volunteer.tui": (
        *CORE,
        "volunteer.control",
        "volunteer.chat.store",
        "volunteer.machine.hardware",
        "volunteer.model_cache.smollm2",
    ),
    "volunteer.control": (*CORE, "volunteer.machine.atomic", "volunteer.model_cache.smollm2"),
    "volunteer.installers": (*CORE, "volunteer.machine.atomic"),
    "volunteer.machine": (*CORE, "volunteer.models", "volunteer.scheduler"),
    "volunteer.transport": (*CORE,),
    "volunteer.swarm": (*CORE, "volunteer.scheduler", "volunteer.transport", "volunteer.machine"),
    "volunteer.model_cache": (*CORE, "volunteer.models", "volunteer.machine", "volunteer.swarm"),
    "volunteer.server": (*CORE, "volunteer.models", "volunteer.transport", "volunteer.machine"),
    "volunteer.trust": (
        *CORE,
        "volunteer.models",
        "volunteer.scheduler",
        "volunteer.transport",
        "volunteer.swarm",
    ),
    "volunteer.client": (
        *CORE,
        "volunteer.models",
        "volunteer.scheduler",
        "volunteer.transport",
        "volunteer.swarm",
        "volunteer.trust",
        "volunteer.machine",
    ),
    "volunteer.api": (
        *CORE,
        "volunteer.chat",
        "volunteer.control",
        "volunteer.client",
        "volunteer.models",
        "volunteer.model_cache",
        "volunteer.daemon",
    ),
    "volunteer.chat": (
        *CORE,
        "volunteer.models",
        "volunteer.client",
        "volunteer.control",
        "volunteer.model_cache",
        "volunteer.machine",
        "volunteer.daemon",
    ),
    "volunteer.finetune": (
        *CORE,
        "volunteer.models",
        "volunteer.client",
        "volunteer.scheduler",
        "volunteer.transport",
        "volunteer.swarm",
        "volunteer.trust",
        "volunteer.machine",
        "volunteer.model_cache",
        "volunteer.chat",
    ),
    "volunteer.training": (
        *CORE,
        "volunteer.models",
        "volunteer.scheduler",
        "volunteer.transport",
        "volunteer.swarm",
        "volunteer.trust",
        "volunteer.machine",
    ),
    "volunteer.daemon": tuple(p for p in OURS if p not in ("volunteer.tui", "volunteer.commands"))
    + CORE,
}
"""Which of our packages each layer may import, besides itself."""

THIRD_PARTY_FORBIDDEN: dict[str, set[str]] = {
    "volunteer.scheduler": {"torch", "hivemind", "textual", "transformers"},
    "volunteer.models": {"hivemind", "textual", "transformers"},
    "volunteer.tui": {"torch", "hivemind", "transformers"},
    "volunteer.control": {"torch", "hivemind", "textual", "transformers"},
    "volunteer.installers": {"torch", "hivemind", "textual", "transformers"},
    "volunteer.daemon": {"textual", "transformers"},
}


def _folder(package: str) -> Path:
    if package in FOLDERS:
        return ROOT / FOLDERS[package]
    return ROOT / package.replace(".", "/")


def _module_files(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted(_folder(package).rglob("*.py")):
        parts = list(path.relative_to(_folder(package)).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        found[".".join([package, *parts])] = path
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every module an import statement in the file names, at any depth."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    # The root package stands for its own __init__ only, not for everything under it.
    return any(name == p or (p != "volunteer" and name.startswith(p + ".")) for p in prefixes)


def _violations(package: str) -> list[str]:
    allowed = (package, *ALLOWED[package])
    found = []
    for module, path in _module_files(package).items():
        for name in sorted(_imports(path, module)):
            if _within(name, OURS) and not _within(name, allowed):
                found.append(f"{module} imports {name}")
            elif name.split(".")[0] in {"models", "scheduler", "tui"}:
                found.append(f"{module} imports {name} (installed as volunteer.{name})")
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_each_layer_imports_only_what_it_may(package: str) -> None:
    assert _violations(package) == []


def test_the_static_check_sees_a_function_level_import(tmp_path: Path) -> None:
    source = tmp_path / "late.py"
    source.write_text("def f():\n    from volunteer.server.handler import BlockHandler\n")
    assert "volunteer.server.handler" in _imports(source, "volunteer.client.late")
    relative = tmp_path / "rel.py"
    relative.write_text("def f():\n    from ..server import handler\n")
    assert "volunteer.server.handler" in _imports(relative, "volunteer.client.rel")


def test_every_package_has_a_rule() -> None:
    packages = {p for p in OURS if p not in ("volunteer.commands",)}
    assert packages <= set(ALLOWED) | {"volunteer.commands"}
    on_disk = {f"volunteer.{d.name}" for d in (ROOT / "volunteer").iterdir()}
    on_disk = {p for p in on_disk if (_folder(p) / "__init__.py").exists()} - set(CORE)
    assert on_disk | set(FOLDERS) == set(OURS)


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


@pytest.mark.parametrize("package", sorted(THIRD_PARTY_FORBIDDEN))
def test_layers_load_no_forbidden_third_party_package(package: str) -> None:
    modules = [m for m in _module_files(package) if not m.endswith(".__main__")]
    loaded = _loaded_after_import(modules)
    forbidden = THIRD_PARTY_FORBIDDEN[package]
    assert not loaded & forbidden, f"{package} pulled in {sorted(loaded & forbidden)}"


def test_the_check_sees_a_real_import() -> None:
    # The probe must notice torch when a module really imports it.
    assert "torch" in _loaded_after_import(["volunteer.models.block"])


def test_the_cli_loads_neither_torch_nor_hivemind() -> None:
    """`volunteer start` sets OpenMP's wait policy before torch loads (its p2pd inherits
    it), and light commands stay light: the CLI's modules import neither at the top."""
    loaded = _loaded_after_import(["volunteer.cli"])
    assert not loaded & {"torch", "hivemind"}, sorted(loaded & {"torch", "hivemind"})
