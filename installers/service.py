"""Installing, inspecting and removing the service, on Linux (systemd), macOS (launchd) and
Windows (Task Scheduler).

Each install writes its files atomically where the platform looks for them, then has the
platform's own tool enable and start it; installing again rewrites only what changed,
and uninstalling stops, disables and removes everything the install wrote. With a `root`
the files go under that folder as if it were `/`, and nothing running is touched: for
images being built, and for tests (systemd's own `--root` modes enable a system unit
there; a user unit's enabling link is made by hand, as `systemctl --user enable` would).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from volunteer.installers.render import (
    LAUNCHD_LABEL,
    SYSTEM_CACHE,
    SYSTEM_HOME,
    SYSTEM_USER,
    TASK_NAME,
    ServiceError,
    ServiceSpec,
    launchd_plist,
    systemd_unit,
    sysusers_conf,
    windows_task,
)

from volunteer.machine.atomic import write_file_atomic

UNIT = "volunteer.service"
PLATFORMS = ("linux", "macos", "windows")
TOOL_TIMEOUT_S = 60.0
"""A service manager that takes longer than this to answer is hung."""

Run = Callable[[list[str]], subprocess.CompletedProcess[str]]


def this_platform() -> str:
    if sys.platform.startswith("linux"):
        return "linux"
    if sys.platform == "darwin":
        return "macos"
    if sys.platform == "win32":
        return "windows"
    raise ServiceError(f"no service manager is supported on {sys.platform}")


def run_tool(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Runs a service manager's command; a missing tool reads as a failed one."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=TOOL_TIMEOUT_S)
    except FileNotFoundError:
        return subprocess.CompletedProcess(argv, 127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return subprocess.CompletedProcess(argv, 124, "", f"{argv[0]}: no answer in time")


def systemd_version(run: Run = run_tool) -> int | None:
    """The installed systemd's version (`systemctl --version`: "systemd 252 (...)")."""
    words = run(["systemctl", "--version"]).stdout.split()
    if len(words) >= 2 and words[0] == "systemd" and words[1].isdigit():
        return int(words[1])
    return None


@dataclasses.dataclass(frozen=True)
class Target:
    """Which service, on which platform, under which root."""

    platform: str
    is_system: bool
    home: Path
    """The installing user's home folder (where user-level files go)."""
    config_dir: Path
    """volunteer's config folder (where a Windows task's definition is kept)."""
    root: Path | None = None
    """Offline: files under this folder, no service manager called."""
    config_home: Path | None = None
    """$XDG_CONFIG_HOME where set (the user's systemd units live under it)."""

    def __post_init__(self) -> None:
        if self.platform not in PLATFORMS:
            raise ServiceError(f"unknown platform {self.platform!r}: one of {PLATFORMS}")

    def place(self, path: Path | PurePosixPath) -> Path:
        """`path` on the machine, or under the offline root."""
        if self.root is None:
            return Path(path)
        return self.root / Path(path).relative_to(Path(path).anchor)

    @property
    def files(self) -> tuple[Path, ...]:
        """Every file an install writes, the service definition first."""
        if self.platform == "linux" and self.is_system:
            return (
                self.place(PurePosixPath("/etc/systemd/system") / UNIT),
                self.place(PurePosixPath("/etc/sysusers.d/volunteer.conf")),
            )
        if self.platform == "linux":
            config_home = self.config_home or self.home / ".config"
            return (self.place(config_home / "systemd" / "user" / UNIT),)
        if self.platform == "macos":
            folder = (
                PurePosixPath("/Library/LaunchDaemons")
                if self.is_system
                else self.home / "Library" / "LaunchAgents"
            )
            return (self.place(Path(folder) / f"{LAUNCHD_LABEL}.plist"),)
        kind = "system" if self.is_system else "user"
        return (self.place(self.config_dir / "service" / f"{TASK_NAME}-{kind}-task.xml"),)

    @property
    def enabled_link(self) -> Path | None:
        """The link that enables a systemd unit (None elsewhere)."""
        if self.platform != "linux":
            return None
        unit = self.files[0]
        wanted_by = "multi-user.target" if self.is_system else "default.target"
        return unit.parent / f"{wanted_by}.wants" / UNIT


@dataclasses.dataclass(frozen=True)
class ServiceStatus:
    installed: bool
    up_to_date: bool
    """The files hold what an install would write now."""
    enabled: bool | None
    """None where it could not be asked."""
    running: str
    """The service manager's word ("active", "inactive", ...), or why it is unknown."""
    files: tuple[Path, ...]

    def lines(self) -> list[str]:
        if not self.installed:
            return ["not installed"]
        state = "up to date" if self.up_to_date else "differs from what install writes now"
        enabled = {True: "yes", False: "no", None: "unknown"}[self.enabled]
        return [
            f"installed: {', '.join(map(str, self.files))} ({state})",
            f"enabled:   {enabled}",
            f"running:   {self.running}",
        ]


class ServiceManager:
    """install / uninstall / status / logs for one `Target`."""

    def __init__(self, target: Target, run: Run = run_tool) -> None:
        self.target = target
        self._run = run

    def contents(self, spec: ServiceSpec) -> dict[Path, bytes]:
        """What an install writes, by path."""
        target = self.target
        if target.platform == "linux":
            texts = [systemd_unit(spec)] + ([sysusers_conf()] if target.is_system else [])
            return {p: t.encode() for p, t in zip(target.files, texts, strict=True)}
        if target.platform == "macos":
            return {target.files[0]: launchd_plist(spec).encode()}
        # schtasks reads a task's XML in UTF-16, as the XML declares.
        return {target.files[0]: windows_task(spec).encode("utf-16")}

    def install(self, spec: ServiceSpec) -> list[str]:
        """Writes, enables and starts the service (restarts it where a file changed under
        a running one); says what it did."""
        if spec.log_file is not None and self.target.root is None:
            Path(spec.log_file).parent.mkdir(parents=True, exist_ok=True)  # launchd won't
        said = []
        for path, content in self.contents(spec).items():
            if path.is_file() and path.read_bytes() == content:
                said.append(f"{path}: up to date")
                continue
            write_file_atomic(path, content)
            path.chmod(0o644)
            said.append(f"wrote {path}")
        changed = any(line.startswith("wrote") for line in said)
        return said + self._enable(restart=changed)

    def uninstall(self) -> list[str]:
        """Stops, disables and removes the service; says what it did."""
        target = self.target
        if not any(path.exists() for path in target.files):
            return ["not installed"]
        said = self._disable()
        for path in target.files:
            if path.exists():
                path.unlink()
                said.append(f"removed {path}")
        if target.platform == "linux" and target.root is None:
            self._tool(self._systemctl("daemon-reload"))
        if target.is_system and target.platform == "linux":
            said.append(
                f"kept the user {SYSTEM_USER} and its files (identity, data, models): "
                f"`userdel {SYSTEM_USER}` and `rm -r {SYSTEM_HOME} {SYSTEM_CACHE}` remove them"
            )
        return said

    def status(self, spec: ServiceSpec) -> ServiceStatus:
        target = self.target
        wanted = self.contents(spec)
        installed = all(path.is_file() for path in wanted)
        up_to_date = installed and all(p.read_bytes() == c for p, c in wanted.items())
        return ServiceStatus(
            installed=installed,
            up_to_date=up_to_date,
            enabled=self._is_enabled() if installed else False,
            running=self._running() if installed else "no",
            files=target.files,
        )

    def logs_command(self, lines: int, follow: bool, log_file: Path) -> list[str]:
        """The command that shows the service's recent log."""
        if self.target.platform == "linux":
            scope = [] if self.target.is_system else ["--user"]
            argv = ["journalctl", *scope, "-u", UNIT, "-n", str(lines), "--no-pager"]
            return argv + (["-f"] if follow else [])
        if self.target.platform == "macos":
            return ["tail", "-n", str(lines), *(["-F"] if follow else []), str(log_file)]
        wait = " -Wait" if follow else ""
        quoted = str(log_file).replace("'", "''")
        return [
            "powershell",
            "-NoProfile",
            "-Command",
            f"Get-Content -Tail {lines}{wait} '{quoted}'",
        ]

    def _enable(self, *, restart: bool) -> list[str]:
        target = self.target
        if target.root is not None:
            return self._enable_offline()
        unit = target.files[0]
        if target.platform == "linux":
            if target.is_system:
                self._tool(["systemd-sysusers", str(target.files[1])], must=True)
            # A user unit may have no user systemd to reload (no login session): below.
            self._tool(self._systemctl("daemon-reload"), must=target.is_system)
            if self._tool(self._systemctl("enable", "--now", UNIT)):
                if restart:  # `enable --now` leaves a running service on its old files
                    self._tool(self._systemctl("try-restart", UNIT))
                return [f"enabled and started {UNIT}"]
            if target.is_system:
                raise ServiceError(f"systemctl could not enable {UNIT} (run as root?)")
            self._link_by_hand()
            return [f"no user systemd answers now: {UNIT} starts at your next login"]
        if target.platform == "macos":
            domain = _launchd_domain(target.is_system)
            self._tool(["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"])  # if loaded
            self._tool(["launchctl", "bootstrap", domain, str(unit)], must=True)
            return [f"loaded {LAUNCHD_LABEL} into launchd ({domain})"]
        create = ["schtasks", "/Create", "/TN", TASK_NAME, "/XML", str(unit), "/F"]
        self._tool(create, must=True)
        self._tool(["schtasks", "/Run", "/TN", TASK_NAME])
        return [f"registered and started the task {TASK_NAME}"]

    def _enable_offline(self) -> list[str]:
        target = self.target
        if target.platform != "linux":
            return ["offline root: the service manager was not called"]
        if not target.is_system:
            self._link_by_hand()
            return [f"enabled {UNIT} (offline root)"]
        assert target.root is not None
        self._tool(["systemd-sysusers", f"--root={target.root}"], must=True)
        self._tool(["systemctl", f"--root={target.root}", "enable", UNIT], must=True)
        return [f"enabled {UNIT} (offline root)"]

    def _disable(self) -> list[str]:
        target = self.target
        if target.platform == "linux":
            link = target.enabled_link
            assert link is not None
            if target.root is not None and target.is_system:
                self._tool(["systemctl", f"--root={target.root}", "disable", UNIT], must=True)
            elif target.root is None:
                self._tool(self._systemctl("disable", "--now", UNIT))
            if link.is_symlink():
                link.unlink()  # by hand where systemctl could not (no user systemd)
            _remove_empty(link.parent)
            return [f"disabled {UNIT}"]
        if target.root is not None:
            return []
        if target.platform == "macos":
            domain = _launchd_domain(target.is_system)
            self._tool(["launchctl", "bootout", f"{domain}/{LAUNCHD_LABEL}"])
            return [f"unloaded {LAUNCHD_LABEL}"]
        self._tool(["schtasks", "/End", "/TN", TASK_NAME])
        self._tool(["schtasks", "/Delete", "/TN", TASK_NAME, "/F"])
        return [f"deleted the task {TASK_NAME}"]

    def _is_enabled(self) -> bool | None:
        target = self.target
        if target.platform == "linux":
            assert target.enabled_link is not None
            return target.enabled_link.is_symlink()
        if target.root is not None:
            return None
        if target.platform == "macos":
            domain = _launchd_domain(target.is_system)
            return self._tool(["launchctl", "print", f"{domain}/{LAUNCHD_LABEL}"])
        return self._tool(["schtasks", "/Query", "/TN", TASK_NAME])

    def _running(self) -> str:
        if self.target.root is not None:
            return "not asked (offline root)"
        if self.target.platform != "linux":
            return "see `volunteer status`"
        result = self._run(self._systemctl("is-active", UNIT))
        word = result.stdout.strip()
        return word or f"unknown ({result.stderr.strip() or 'systemctl said nothing'})"

    def _systemctl(self, *args: str) -> list[str]:
        return ["systemctl", *([] if self.target.is_system else ["--user"]), *args]

    def _link_by_hand(self) -> None:
        link = self.target.enabled_link
        assert link is not None
        link.parent.mkdir(parents=True, exist_ok=True)
        if not link.is_symlink():
            link.symlink_to(Path("..") / UNIT)

    def _tool(self, argv: list[str], *, must: bool = False) -> bool:
        result = self._run(argv)
        if result.returncode != 0 and must:
            why = (result.stderr or result.stdout).strip() or f"exit status {result.returncode}"
            raise ServiceError(f"`{' '.join(argv)}` failed: {why}")
        return result.returncode == 0


def _launchd_domain(is_system: bool) -> str:
    return "system" if is_system else f"gui/{os.getuid()}"  # type: ignore[attr-defined,unused-ignore]


def _remove_empty(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not empty, or already gone
        folder.rmdir()
