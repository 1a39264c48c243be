"""`volunteer service install|uninstall|status|logs [--system]`: the daemon as an OS service.

The service runs `volunteer start --foreground` with this Python and this home (so the
same settings file); `--system` runs it at boot as a dedicated user instead of at the
owner's login (installing it needs root, or an administrator on Windows).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from volunteer.installers.render import SYSTEM_CACHE, SYSTEM_HOME, ServiceError, ServiceSpec
from volunteer.installers.service import (
    PLATFORMS,
    ServiceManager,
    Target,
    systemd_version,
    this_platform,
)
from volunteer.paths import Paths

PASSED_ON = ("VOLUNTEER_CACHE_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME")
"""Variables of the installing shell that the service keeps, so that it finds the same
folders (a service manager starts its services with an environment of its own)."""


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "service",
        help="run the daemon as a service: at login (or boot), restarted if it dies",
        description="Installs the daemon under this platform's service manager: a systemd "
        "user unit (Linux), a launchd agent (macOS) or a Task Scheduler logon task "
        "(Windows), running `volunteer start --foreground` with this home's settings.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    for name, text in (
        ("install", "write, enable and start the service (again: rewrites what changed)"),
        ("uninstall", "stop, disable and remove the service (your data stays)"),
        ("status", "whether it is installed, enabled and running"),
        ("logs", "the service's recent log"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        action.add_argument(
            "--system",
            action="store_true",
            help="at boot as the dedicated user 'volunteer' (needs root), not at your login",
        )
        action.add_argument(
            "--root",
            metavar="DIR",
            help="write under DIR as if it were / and call no service manager (images, tests)",
        )
        action.add_argument("--platform", choices=PLATFORMS, help=argparse.SUPPRESS)
        if name == "logs":
            action.add_argument("-n", "--lines", type=int, default=100, help="how many lines")
            action.add_argument("-f", "--follow", action="store_true", help="keep printing")
        action.set_defaults(handler=run)


def run(args: argparse.Namespace, paths: Paths) -> int:
    platform = args.platform or this_platform()
    if args.system and platform != "linux":
        raise ServiceError(
            "--system is for Linux (a systemd unit and its own user) for now: on "
            f"{platform}, install it for your user (without --system)"
        )
    target = Target(
        platform=platform,
        is_system=args.system,
        home=Path.home(),
        config_dir=paths.config_dir,
        root=Path(args.root).resolve() if args.root else None,
        config_home=Path(os.environ["XDG_CONFIG_HOME"])
        if os.environ.get("XDG_CONFIG_HOME")
        else None,
    )
    manager = ServiceManager(target)
    home = args.home or os.environ.get("VOLUNTEER_HOME")
    spec = service_spec(home, platform, is_system=args.system)
    if args.action == "install":
        _warn_about_the_python(args.system)
        lines = manager.install(spec)
    elif args.action == "uninstall":
        lines = manager.uninstall()
    elif args.action == "status":
        lines = manager.status(spec).lines()
    else:
        log_file = paths.daemon_log if platform != "macos" else _launchd_log(paths)
        argv = manager.logs_command(args.lines, args.follow, log_file)
        try:
            return subprocess.call(argv)
        except FileNotFoundError as exc:
            raise ServiceError(f"cannot show the log: {argv[0]} is not installed") from exc
    for line in lines:
        print(f"volunteer: {line}")
    return 0


def service_spec(home: str | None, platform: str, *, is_system: bool) -> ServiceSpec:
    """What the service runs: this Python on the installing command's home (if it named
    one; the dedicated user's own for `--system`), in the installing shell's folders."""
    argv = [_python(platform), "-m", "volunteer"]
    if is_system:
        argv += ["--home", SYSTEM_HOME]
    elif home:
        argv += ["--home", str(Path(home).expanduser().resolve())]
    argv += ["start", "--foreground"]
    environment: tuple[tuple[str, str], ...] = ()
    if is_system and platform == "linux":
        environment = (("VOLUNTEER_CACHE_DIR", SYSTEM_CACHE),)
    elif not is_system and platform != "windows":
        environment = tuple((k, os.environ[k]) for k in PASSED_ON if os.environ.get(k))
    log_file = None
    if platform == "macos" and not is_system:
        log_file = _launchd_log(Paths.resolve(home=home, env=os.environ))
    return ServiceSpec(
        argv=tuple(argv),
        user_id=_windows_user() if platform == "windows" else None,
        environment=environment,
        is_system=is_system,
        log_file=log_file,
        systemd_version=systemd_version() if platform == "linux" else None,
    )


def _python(platform: str) -> str:
    """This Python; on Windows its windowless twin, so that no console opens at logon
    (closing it would end the daemon)."""
    if platform == "windows":
        windowless = Path(sys.executable).with_name("pythonw.exe")
        if windowless.exists():
            return str(windowless)
    return sys.executable


def _windows_user() -> str | None:
    """DOMAIN\\user of the installing user: whose logon starts the task."""
    user = os.environ.get("USERNAME")
    domain = os.environ.get("USERDOMAIN")
    return f"{domain}\\{user}" if user and domain else user


def _launchd_log(paths: Paths) -> Path:
    """Where launchd writes what the daemon prints before its own log is open."""
    return paths.log_dir / "service.log"


def _warn_about_the_python(is_system: bool) -> None:
    if is_system and Path(sys.executable).is_relative_to(Path.home()):
        print(
            f"volunteer: note: the service runs {sys.executable}, under your home: the "
            "'volunteer' user must be able to read it (a system-wide install, e.g. a venv "
            "in /opt, avoids that)",
            file=sys.stderr,
        )
