"""install -> status -> uninstall in a temporary root: every platform's files land where its
service manager looks, a second install changes nothing, and an uninstall leaves no file
or enabling link behind. systemd's own `--root` modes enable the system unit (and create
its user) there; the CLI is driven as a person would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from volunteer.installers.render import ServiceSpec
from volunteer.installers.service import ServiceManager, Target

ROOT = Path(__file__).resolve().parents[2]
SYSUSERS_DATABASE = {"passwd", "group", "shadow", "gshadow", ".pwd.lock"}
"""What `systemd-sysusers --root` writes: the user stays after an uninstall (its files
hold the identity and data), as a package's user does."""


def _spec(is_system: bool, platform: str) -> ServiceSpec:
    argv = (sys.executable, "-m", "volunteer", "--home", "/srv/v h", "start", "--foreground")
    environment = () if platform == "windows" else (("VOLUNTEER_CACHE_DIR", "/srv/cache"),)
    return ServiceSpec(argv=argv, environment=environment, is_system=is_system)


def _left(root: Path) -> set[str]:
    """Files and links under root, but the user database."""
    return {
        str(p.relative_to(root))
        for p in root.rglob("*")
        if (p.is_file() or p.is_symlink()) and p.name not in SYSUSERS_DATABASE
    }


CASES = [
    ("linux", False, [".config/systemd/user/volunteer.service"]),
    ("linux", True, ["etc/systemd/system/volunteer.service", "etc/sysusers.d/volunteer.conf"]),
    ("macos", False, ["Library/LaunchAgents/org.volunteer.daemon.plist"]),
    ("macos", True, ["Library/LaunchDaemons/org.volunteer.daemon.plist"]),
    ("windows", False, ["config/service/volunteer-user-task.xml"]),
    ("windows", True, ["config/service/volunteer-system-task.xml"]),
]


@pytest.mark.parametrize(("platform", "is_system", "files"), CASES)
def test_install_status_uninstall_leaves_nothing_behind(
    tmp_path: Path, platform: str, is_system: bool, files: list[str]
) -> None:
    if platform == "linux" and is_system and shutil.which("systemd-sysusers") is None:
        pytest.skip("needs systemd (apt install systemd)")
    root = tmp_path / "root"
    home = Path("/home/alice")
    target = Target(platform, is_system, home=home, config_dir=home / "config", root=root)
    manager = ServiceManager(target)
    spec = _spec(is_system, platform)
    assert manager.status(spec).lines() == ["not installed"]

    said = manager.install(spec)
    prefix = "" if is_system and platform != "windows" else "home/alice/"
    wanted = {prefix + f for f in files}
    link = target.enabled_link
    if link is not None:
        assert link.is_symlink() and link.resolve().name == "volunteer.service"
        wanted.add(str(link.relative_to(root)))
    assert _left(root) == wanted, said
    status = manager.status(spec)
    assert status.installed and status.up_to_date
    assert status.enabled is (True if platform == "linux" else None)

    before = {p: p.stat().st_mtime_ns for p in target.files}
    again = manager.install(spec)
    assert not any(line.startswith("wrote") for line in again), again
    assert {p: p.stat().st_mtime_ns for p in target.files} == before  # nothing rewritten

    target.files[0].write_bytes(target.files[0].read_bytes() + b"\n# edited\n")
    assert not manager.status(spec).up_to_date
    manager.install(spec)
    assert manager.status(spec).up_to_date

    said = manager.uninstall()
    assert _left(root) == set(), said
    assert manager.status(spec).lines() == ["not installed"]
    assert manager.uninstall() == ["not installed"]
    if platform == "linux" and is_system:
        passwd = (root / "etc" / "passwd").read_text()
        assert any(line.startswith("volunteer:") for line in passwd.splitlines())


def test_the_cli_installs_reports_and_removes_in_a_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VOLUNTEER_", "XDG_"))}
    home = tmp_path / "home of mine"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        argv = [sys.executable, "-m", "volunteer", "--home", str(home), "service", *args]
        argv += ["--root", str(root), "--platform", "linux"]
        return subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)

    installed = cli("install")
    assert installed.returncode == 0, installed.stderr
    unit = next(root.rglob("volunteer.service"))
    text = unit.read_text()
    assert f'--home "{home}" start --foreground' in text  # this home: the same settings
    status = cli("status")
    assert status.returncode == 0 and "up to date" in status.stdout
    assert "enabled:   yes" in status.stdout
    removed = cli("uninstall")
    assert removed.returncode == 0, removed.stderr
    assert not unit.exists()
    assert "not installed" in cli("status").stdout


def test_a_system_service_off_linux_is_refused_clearly(tmp_path: Path) -> None:
    argv = [sys.executable, "-m", "volunteer", "--home", str(tmp_path / "h"), "service"]
    argv += ["install", "--system", "--platform", "macos", "--root", str(tmp_path / "root")]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "--system is for Linux" in done.stderr
    assert not (tmp_path / "root").exists()
