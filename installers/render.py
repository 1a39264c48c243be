"""Service files from the templates in `templates/`, with every value escaped for its format.

A value that no format can carry safely (a newline or another control character in a path
or an argument) is refused with `ServiceError` rather than written.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import string
import subprocess
from pathlib import PurePath
from xml.sax.saxutils import escape

from volunteer.errors import VolunteerError

LAUNCHD_LABEL = "org.volunteer.daemon"
TASK_NAME = "volunteer"
SYSTEM_USER = "volunteer"
SYSTEM_HOME = "/var/lib/volunteer"
"""The system service's home (systemd's StateDirectory): its config, data and identity."""
SYSTEM_CACHE = "/var/cache/volunteer"
"""The system service's model cache (systemd's CacheDirectory)."""
TYPE_EXEC_SINCE = 240
"""The systemd version that added Type=exec."""
RESTART_STEPS_SINCE = 254
"""The systemd version that added RestartSteps/RestartMaxDelaySec (growing back-off)."""


class ServiceError(VolunteerError):
    """A service that cannot be written, installed or removed as asked."""


@dataclasses.dataclass(frozen=True)
class ServiceSpec:
    """What a service runs, and as whom."""

    argv: tuple[str, ...]
    """The command: this Python, `-m volunteer`, the home, `start --foreground`."""
    environment: tuple[tuple[str, str], ...] = ()
    is_system: bool = False
    """At boot as the dedicated user, rather than at its owner's login."""
    log_file: PurePath | None = None
    """Where launchd sends the output (systemd sends it to the journal)."""
    systemd_version: int | None = None
    """The installed systemd's, to use no key it would not know."""
    user_id: str | None = None
    """Windows: DOMAIN\\user whose logon starts the task (a task for any user's logon
    needs an administrator)."""

    def __post_init__(self) -> None:
        values = [*self.argv, *(k for k, _ in self.environment), *(v for _, v in self.environment)]
        if self.log_file is not None:
            values.append(str(self.log_file))
        if self.user_id is not None:
            values.append(self.user_id)
        for value in values:
            if any(ord(c) < 32 or ord(c) == 127 for c in value):
                raise ServiceError(
                    f"a service cannot carry {value!r}: it holds a control character"
                )
        for key, _ in self.environment:
            if not key or not key.replace("_", "").isalnum() or key[0].isdigit():
                raise ServiceError(f"{key!r} is not an environment variable name")


def systemd_unit(spec: ServiceSpec) -> str:
    """The systemd unit: user or system (with its dedicated user) as `spec` says."""
    backoff = ""
    version = spec.systemd_version
    if version is not None and version >= RESTART_STEPS_SINCE:
        backoff = "RestartSteps=5\nRestartMaxDelaySec=10min"
    # exec: a start fails if the command cannot run at all (simple before systemd 240).
    kind = "simple" if version is not None and version < TYPE_EXEC_SINCE else "exec"
    environment = "\n".join(
        f"Environment={_systemd_quote(f'{key}={value}', is_command=False)}"
        for key, value in spec.environment
    )
    name = "systemd-system.service" if spec.is_system else "systemd-user.service"
    return _fill(
        name,
        exec_start=" ".join(_systemd_quote(arg) for arg in spec.argv),
        environment=environment,
        restart_backoff=backoff,
        service_type=kind,
        user=SYSTEM_USER,
    )


def sysusers_conf() -> str:
    """systemd-sysusers' line for the system service's user."""
    return _fill("systemd-sysusers.conf", user=SYSTEM_USER, home=SYSTEM_HOME)


def launchd_plist(spec: ServiceSpec) -> str:
    """A launchd agent (or, for the system, a daemon run as the dedicated user)."""
    arguments = "\n".join(f"\t\t<string>{escape(arg)}</string>" for arg in spec.argv)
    environment = "\n".join(
        f"\t\t<key>{escape(key)}</key>\n\t\t<string>{escape(value)}</string>"
        for key, value in spec.environment
    )
    user_name = f"\t<key>UserName</key>\n\t<string>{SYSTEM_USER}</string>" if spec.is_system else ""
    log_file = spec.log_file if spec.log_file is not None else PurePath("/dev/null")
    return _fill(
        "launchd.plist",
        label=LAUNCHD_LABEL,
        arguments=arguments,
        environment=environment,
        user_name=user_name,
        log_file=escape(str(log_file)),
    )


def windows_task(spec: ServiceSpec) -> str:
    """A Task Scheduler task: at its owner's logon, or at boot as the local service
    account. (A task has no environment of its own: settings go in the config file.)"""
    if spec.is_system:
        trigger = "    <BootTrigger>\n      <Enabled>true</Enabled>\n    </BootTrigger>"
        principal = "      <UserId>S-1-5-19</UserId>\n      <RunLevel>LeastPrivilege</RunLevel>"
    else:
        user = f"\n      <UserId>{escape(spec.user_id)}</UserId>" if spec.user_id else ""
        trigger = f"    <LogonTrigger>\n      <Enabled>true</Enabled>{user}\n    </LogonTrigger>"
        principal = f"      <UserId>{escape(spec.user_id)}</UserId>\n" if spec.user_id else ""
        principal += "      <LogonType>InteractiveToken</LogonType>\n"
        principal += "      <RunLevel>LeastPrivilege</RunLevel>"
    if spec.environment:
        names = ", ".join(key for key, _ in spec.environment)
        raise ServiceError(
            f"a Windows task carries no environment ({names}): put those settings in the "
            "config file"
        )
    command, *arguments = spec.argv
    return _fill(
        "windows-task.xml",
        task_name=TASK_NAME,
        trigger=trigger,
        principal=principal,
        command=escape(command),
        arguments=escape(subprocess.list2cmdline(arguments)),
    )


def _systemd_quote(value: str, *, is_command: bool = True) -> str:
    """One word of a unit's command line (or an Environment= assignment), as systemd
    reads it back: double quotes where needed, `\\` and `"` escaped, `%` (specifiers)
    doubled, and in a command `$` (variables) doubled."""
    escaped = value.replace("%", "%%")
    if is_command:
        escaped = escaped.replace("$", "$$")
    if escaped and not any(c in escaped for c in " \t\"'\\;"):
        return escaped
    return '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _fill(template: str, **values: str) -> str:
    """The template with `values` in; a line that only holds a placeholder whose value is
    empty goes altogether."""
    text = (importlib.resources.files(__package__) / "templates" / template).read_text("utf-8")
    empty = {f"${name}" for name, value in values.items() if not value}
    kept = [line for line in text.splitlines(keepends=True) if line.strip() not in empty]
    return string.Template("".join(kept)).substitute(values)
