"""The service files as each platform's own reader takes them: `systemd-analyze verify` for
the units, plistlib for launchd's property list, an XML parser for the Windows task; with
values that need escaping in each format."""

from __future__ import annotations

import os
import plistlib
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from volunteer.installers.render import (
    LAUNCHD_LABEL,
    RESTART_STEPS_SINCE,
    ServiceError,
    ServiceSpec,
    launchd_plist,
    systemd_unit,
    sysusers_conf,
    windows_task,
)

AWKWARD_HOME = "/tmp/a home/with \"quotes\", 'apostrophes', 50% & <tags> $HOME\\x"
"""A home folder that needs escaping in every format."""
TASK_NS = {"t": "http://schemas.microsoft.com/windows/2004/02/mit/task"}


def _spec(is_system: bool = False, **changes) -> ServiceSpec:
    argv = (sys.executable, "-m", "volunteer", "--home", AWKWARD_HOME, "start", "--foreground")
    fields = {
        "argv": argv,
        "environment": (("VOLUNTEER_CACHE_DIR", "/tmp/cache 100%"),),
        "is_system": is_system,
        "log_file": Path("/tmp/logs & more/service.log"),
        **changes,
    }
    return ServiceSpec(**fields)


def _verify(unit: Path, tmp_path: Path, *, user: bool) -> subprocess.CompletedProcess[str]:
    runtime = tmp_path / "runtime"
    runtime.mkdir(mode=0o700, exist_ok=True)
    argv = ["systemd-analyze", "verify", *(["--user"] if user else []), str(unit)]
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)


needs_systemd = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="needs systemd-analyze (apt install systemd)"
)


@needs_systemd
@pytest.mark.parametrize("is_system", [False, True], ids=["user", "system"])
def test_systemd_accepts_the_unit_without_a_word(tmp_path: Path, is_system: bool) -> None:
    unit = tmp_path / "volunteer.service"
    unit.write_text(systemd_unit(_spec(is_system)))
    result = _verify(unit, tmp_path, user=not is_system)
    assert result.returncode == 0, result.stderr
    for complaint in ("Unknown", "unknown", "Failed", "Invalid", "invalid", "not executable"):
        assert complaint not in result.stderr + result.stdout  # no unknown key, no typo


def test_the_command_is_quoted_as_systemd_unquotes_it() -> None:
    """systemd.service(5) "Command lines": double quotes around a word with spaces or
    quotes, C escapes for backslash and double quote inside them, % doubled (specifiers)
    and, in commands, $ doubled (variables). Environment= doubles only %."""
    lines = systemd_unit(_spec()).splitlines()
    exec_start = next(line for line in lines if line.startswith("ExecStart="))
    home = '"/tmp/a home/with \\"quotes\\", \'apostrophes\', 50%% & <tags> $$HOME\\\\x"'
    assert exec_start == f"ExecStart={sys.executable} -m volunteer --home {home} start --foreground"
    assert 'Environment="VOLUNTEER_CACHE_DIR=/tmp/cache 100%%"' in lines


def test_the_unit_uses_keys_only_where_systemd_knows_them() -> None:
    old = systemd_unit(_spec(systemd_version=RESTART_STEPS_SINCE - 1))
    new = systemd_unit(_spec(systemd_version=RESTART_STEPS_SINCE))
    assert "RestartSteps" not in old and "RestartSteps=5" in new
    assert "Type=exec" in old.splitlines()
    assert "Type=simple" in systemd_unit(_spec(systemd_version=239)).splitlines()
    for text in (old, new):
        assert "Restart=on-failure" in text and "Nice=10" in text
        assert "IOSchedulingClass=idle" in text and "NoNewPrivileges=yes" in text
        assert "\n\n\n" not in text  # empty placeholders leave no holes


def test_the_system_unit_runs_as_its_own_user_with_its_own_folders() -> None:
    text = systemd_unit(_spec(is_system=True))
    wanted = ["User=volunteer", "StateDirectory=volunteer", "CacheDirectory=volunteer"]
    wanted += ["ProtectSystem=strict", "PrivateTmp=yes", "WantedBy=multi-user.target"]
    for line in wanted:
        assert line in text.splitlines(), line
    user = systemd_unit(_spec())
    assert "User=" not in user and "PrivateTmp" not in user  # idle detection needs the session
    assert "WantedBy=default.target" in user.splitlines()
    assert sysusers_conf().splitlines()[-1] == 'u volunteer - "volunteer daemon" /var/lib/volunteer'


@pytest.mark.parametrize("is_system", [False, True], ids=["agent", "daemon"])
def test_launchd_reads_back_every_value(is_system: bool) -> None:
    spec = _spec(is_system)
    plist = plistlib.loads(launchd_plist(spec).encode())
    assert plist["Label"] == LAUNCHD_LABEL
    assert plist["ProgramArguments"] == list(spec.argv)
    assert plist["EnvironmentVariables"] == dict(spec.environment)
    assert plist["StandardErrorPath"] == str(spec.log_file)
    assert plist["RunAtLoad"] is True and plist["KeepAlive"] == {"SuccessfulExit": False}
    assert plist["ProcessType"] == "Background" and plist["LowPriorityIO"] is True
    assert plist["Nice"] == 10
    assert plist.get("UserName") == ("volunteer" if is_system else None)


@pytest.mark.parametrize("is_system", [False, True], ids=["logon", "boot"])
def test_the_windows_task_parses_with_what_schtasks_needs(is_system: bool) -> None:
    spec = _spec(is_system, environment=(), user_id="HOST\\ada & <co>")
    data = windows_task(spec).encode("utf-16")
    task = ET.fromstring(data)
    assert task.tag == f"{{{TASK_NS['t']}}}Task" and task.get("version") == "1.2"
    for part in ("RegistrationInfo", "Triggers", "Principals", "Settings", "Actions"):
        assert task.find(f"t:{part}", TASK_NS) is not None, part
    trigger = "BootTrigger" if is_system else "LogonTrigger"
    assert task.find(f"t:Triggers/t:{trigger}", TASK_NS) is not None
    principal = task.findtext("t:Principals/t:Principal/t:UserId", namespaces=TASK_NS)
    if is_system:
        assert principal == "S-1-5-19"  # the local service account
    else:  # this user's logon only: registering a task for anyone's needs an administrator
        assert principal == spec.user_id
        assert task.findtext(f"t:Triggers/t:{trigger}/t:UserId", namespaces=TASK_NS) == principal
    assert task.findtext("t:Actions/t:Exec/t:Command", namespaces=TASK_NS) == spec.argv[0]
    arguments = task.findtext("t:Actions/t:Exec/t:Arguments", namespaces=TASK_NS)
    assert arguments == subprocess.list2cmdline(spec.argv[1:])
    assert task.findtext("t:Settings/t:Priority", namespaces=TASK_NS) == "7"
    assert task.find("t:Settings/t:RestartOnFailure", TASK_NS) is not None


def test_a_windows_task_refuses_an_environment_it_cannot_carry() -> None:
    with pytest.raises(ServiceError, match="config file"):
        windows_task(_spec())


@pytest.mark.parametrize(
    "changes",
    [
        {"argv": (sys.executable, "-m", "volunteer", "--home", "/tmp/a\nExecStartPre=/bin/sh")},
        {"environment": (("VOLUNTEER_CACHE_DIR", "/tmp/x\r\n[Install]"),)},
        {"environment": (("BAD NAME", "x"),)},
        {"log_file": Path("/tmp/\x00log")},
    ],
    ids=["newline-in-argv", "newline-in-env", "bad-env-name", "nul-in-log"],
)
def test_values_no_format_can_carry_are_refused(changes) -> None:
    with pytest.raises(ServiceError):
        _spec(**changes)
