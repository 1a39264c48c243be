"""Starting the daemon in the background, finding it, and stopping it.

The daemon owns a pid file (`daemon.pid` in the runtime dir: its pid and its process
start time, so a recycled pid is not mistaken for it). `start_background` spawns
`python -m volunteer ... start --foreground` as a new session with its output going to
`daemon.out` in the log dir, then waits until the control API reports "serving" or the
process fails; a failed start is reported once the daemon has exited and cleaned up
(its pid file and socket gone), so whoever reads the failure finds no leftovers. `stop`
asks over the control API, then falls back to SIGTERM and SIGKILL.

Only one daemon runs per home: it holds an exclusive lock on `daemon.lock` (flock; a
byte-range lock on Windows) for its whole life, taken before it creates anything. The pid
file only finds the daemon; two starts racing both see no pid file, and the lock (released
by the OS when its holder dies, even by SIGKILL) is what lets exactly one of them run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import psutil

from volunteer.control.client import ControlClient
from volunteer.control.endpoint import ControlError, private_dir, socket_path, use_tcp
from volunteer.control.messages import STATUS, STOP, StatusReply, StopParams
from volunteer.errors import VolunteerError
from volunteer.machine.atomic import write_file_atomic
from volunteer.paths import Paths

if os.name == "nt":
    import msvcrt
else:
    import fcntl

logger = logging.getLogger(__name__)

PID_FILE_NAME = "daemon.pid"
LOCK_FILE_NAME = "daemon.lock"
PRIVATE_UMASK = 0o077
"""The daemon's umask: what it creates (logs, chat history, sockets, p2pd's sockets)
is its user's alone."""
OUTPUT_FILE_NAME = "daemon.out"
_POLL_S = 0.05
"""How often `start` and `stop` look at the daemon: a local socket call is cheap, and
`start` returns that much sooner after the daemon is serving."""
FAILED_EXIT_WAIT_S = 60.0
"""Longest wait for a daemon that failed to start to stop its services and exit (it
stops each within `runner.SERVICE_STOP_TIMEOUT_S`); only bounds a hang."""


@dataclasses.dataclass(frozen=True)
class StartResult:
    """What `start_background` saw."""

    outcome: Literal["serving", "already_running", "failed", "timeout"]
    pid: int | None
    message: str
    """One line for the person: how to join, why it failed, or what to do next."""
    status: StatusReply | None = None
    """The daemon's last `status` answer, when it gave one."""


@dataclasses.dataclass(frozen=True)
class StopResult:
    """What `stop` did."""

    outcome: Literal["stopped", "terminated", "killed", "not_running"]
    pid: int | None


def pid_file(paths: Paths) -> Path:
    """The pid file of the instance."""
    return paths.runtime_dir / PID_FILE_NAME


def output_file(paths: Paths) -> Path:
    """Where a background daemon's stdout and stderr go (rewritten at each start)."""
    return paths.log_dir / OUTPUT_FILE_NAME


class AlreadyRunningError(VolunteerError):
    """Another daemon holds this home's lock."""

    def __init__(self, pid: int | None) -> None:
        super().__init__(f"already running (pid {pid})" if pid else "already running")
        self.pid = pid


def lock_file(paths: Paths) -> Path:
    """The file whose lock the instance's daemon holds for its life."""
    return paths.runtime_dir / LOCK_FILE_NAME


def use_private_umask() -> None:
    """Makes everything this process creates from now on private to its user."""
    os.umask(PRIVATE_UMASK)


@contextlib.contextmanager
def daemon_lock(paths: Paths) -> Iterator[None]:
    """Holds the instance's lock while the block runs (the daemon's whole life).

    Raises:
        AlreadyRunningError: another process holds it.
    """
    private_dir(paths.runtime_dir)
    # The file is never removed: a removal would let a third start lock a new file while
    # a second still waits on the old one.
    fd = os.open(lock_file(paths), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if not _try_lock(fd):
            raise AlreadyRunningError(_pid_in(fd))
        # For the message a losing start prints; the pid file stays the daemon's record.
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_holder(paths: Paths) -> int | None:
    """The pid of the process holding the instance's lock (0 until it has written it),
    or None when the lock is free."""
    try:
        fd = os.open(lock_file(paths), os.O_RDWR)
    except FileNotFoundError:
        return None
    try:
        return None if _try_lock(fd) else (_pid_in(fd) or 0)
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        if os.name == "nt":
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        else:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:  # BlockingIOError (posix) or PermissionError (Windows): it is held
        return False
    return True


def _pid_in(fd: int) -> int | None:
    text = os.pread(fd, 32, 0) if hasattr(os, "pread") else b""
    return int(text) if text.strip().isdigit() else None


def write_pid_file(paths: Paths) -> None:
    """Records this process as the instance's daemon."""
    me = psutil.Process()
    record = {"pid": me.pid, "started_at": me.create_time()}
    write_file_atomic(pid_file(paths), json.dumps(record).encode())


def remove_pid_file(paths: Paths, pid: int) -> None:
    """Removes the pid file if it still names `pid` (a newer daemon's file is kept)."""
    if _read_pid_record(paths).get("pid") == pid:
        pid_file(paths).unlink(missing_ok=True)


def running_daemon(paths: Paths) -> int | None:
    """The pid of the instance's live daemon, or None.

    A pid file whose process is gone, is a zombie, or is another process that reuses the
    pid (its start time differs) is stale: it is removed and None is returned.
    """
    record = _read_pid_record(paths)
    if not record:
        return None
    pid = record.get("pid")
    if isinstance(pid, int) and _is_same_process(pid, record.get("started_at")):
        return pid
    logger.info("removing the stale pid file %s (pid %s is not our daemon)", pid_file(paths), pid)
    pid_file(paths).unlink(missing_ok=True)
    return None


def start_background(
    paths: Paths,
    child_argv: Sequence[str],
    *,
    timeout_s: float,
    env: Mapping[str, str] | None = None,
) -> StartResult:
    """Spawns the daemon detached and waits until it serves, fails or times out.

    Args:
        paths: the instance's folders.
        child_argv: arguments after `python -m volunteer` (global options, `start`,
            `--foreground` and the start flags).
        timeout_s: how long to wait for "serving".
        env: the child's environment (default: this process's).

    Returns:
        The outcome; on "timeout" the daemon is left running (it may be fetching a model).
    """
    pid = running_daemon(paths)
    if pid is not None:
        return StartResult("already_running", pid, f"already running (pid {pid})")
    out_path = output_file(paths)
    out_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    # A log: created private, and one an older version left readable is tightened (not
    # replaced: a racing start's daemon may be writing to it).
    with open(os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
        if os.name == "posix":
            os.fchmod(out.fileno(), 0o600)
        proc = subprocess.Popen(
            [sys.executable, "-m", "volunteer", *child_argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            **_detach_kwargs(),
        )
    return _wait_until_serving(paths, proc, timeout_s=timeout_s)


def stop(paths: Paths, *, timeout_s: float = 30.0, now: bool = False) -> StopResult:
    """Stops the instance's daemon: gracefully, then SIGTERM, then SIGKILL.

    Args:
        paths: the instance's folders.
        timeout_s: how long the daemon has to leave the swarm before it is killed, on
            top of the grace it says it may take to hand its blocks over.
        now: leave without handing blocks over (`volunteer.daemon.hand_over`).
    """
    pid = running_daemon(paths)
    if pid is None:
        return StopResult("not_running", None)
    process = psutil.Process(pid)
    outcome: Literal["stopped", "terminated", "killed"] = "stopped"
    try:
        reply = ControlClient(paths).call(STOP, StopParams(now=now), timeout_s=5.0)
        timeout_s += reply.grace_s
    except ControlError as exc:
        logger.info("graceful stop of pid %d failed (%s); sending SIGTERM", pid, exc)
        outcome = "terminated"
        _signal(process, kill=False)
    if not _wait_gone(process, timeout_s):
        logger.warning("pid %d still running after %.0f s; killing it", pid, timeout_s)
        outcome = "killed"
        _signal(process, kill=True)
        _wait_gone(process, 5.0)
    # A killed daemon cannot clean up after itself.
    remove_pid_file(paths, pid)
    if outcome == "killed" and not use_tcp():
        socket_path(paths).unlink(missing_ok=True)
    return StopResult(outcome, pid)


def last_error_line(path: Path) -> str | None:
    """The most telling line of a daemon's output: its last error, else its last line."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return None
    lines = [line.strip() for line in lines if line.strip()]
    for marker in ("volunteer: error:", "ERROR", "Error"):
        for line in reversed(lines):
            if marker in line:
                return line
    return lines[-1] if lines else None


def _wait_until_serving(paths: Paths, proc: subprocess.Popen, *, timeout_s: float) -> StartResult:
    client = ControlClient(paths)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        code = proc.poll()
        if code is not None:
            return _exited(paths, proc, code)
        try:
            status = client.call(STATUS, timeout_s=2.0)
        except ControlError:
            time.sleep(_POLL_S)  # not listening yet
            continue
        if status.pid != proc.pid:
            # A racing start's daemon answers; ours will exit on the lock it holds.
            time.sleep(_POLL_S)
            continue
        if status.state == "serving":
            return StartResult("serving", proc.pid, "serving", status)
        if status.state == "failed":
            _reap_failed(paths, proc)
            reason = status.error or last_error_line(output_file(paths))
            return StartResult("failed", proc.pid, f"the daemon failed: {reason}", status)
        time.sleep(_POLL_S)
    return StartResult(
        "timeout",
        proc.pid,
        f"still starting after {timeout_s:.0f} s (pid {proc.pid}); it goes on in the "
        "background: `volunteer status` shows its progress, `volunteer stop` stops it",
    )


def _exited(paths: Paths, proc: subprocess.Popen, code: int) -> StartResult:
    _reap_failed(paths, proc)
    holder = lock_holder(paths)
    if holder is not None:  # another start won the race for the lock
        return StartResult("already_running", holder, str(AlreadyRunningError(holder)))
    reason = last_error_line(output_file(paths)) or f"exit code {code}"
    return StartResult("failed", proc.pid, f"the daemon exited: {reason}")


def _reap_failed(paths: Paths, proc: subprocess.Popen) -> None:
    """Waits for a daemon that failed to start to exit, so its failure is reported after
    its cleanup; removes what a daemon that could not clean up left behind."""
    try:
        proc.wait(timeout=FAILED_EXIT_WAIT_S)
    except subprocess.TimeoutExpired:
        logger.warning("pid %d failed to start and is still running; leaving it", proc.pid)
        return
    # Removes its pid file if it is still there; the socket only if no daemon took over.
    if running_daemon(paths) is None and not use_tcp():
        socket_path(paths).unlink(missing_ok=True)


def _detach_kwargs() -> dict[str, Any]:
    if os.name == "nt":
        flags = subprocess.CREATE_NEW_PROCESS_GROUP | subprocess.DETACHED_PROCESS
        return {"creationflags": flags}
    # A new session: the terminal's Ctrl-C and hang-up no longer reach the daemon.
    return {"start_new_session": True}


def _read_pid_record(paths: Paths) -> dict[str, Any]:
    try:
        record = json.loads(pid_file(paths).read_text())
    except (FileNotFoundError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _is_same_process(pid: int, started_at: Any) -> bool:
    try:
        process = psutil.Process(pid)
        if process.status() == psutil.STATUS_ZOMBIE:
            return False
        return isinstance(started_at, (int, float)) and abs(process.create_time() - started_at) < 1
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def _signal(process: psutil.Process, *, kill: bool) -> None:
    with contextlib.suppress(psutil.NoSuchProcess):
        if kill:
            process.kill()
        else:
            process.terminate()


def _wait_gone(process: psutil.Process, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if process.status() == psutil.STATUS_ZOMBIE:
                return True
            process.wait(timeout=_POLL_S)
            return True
        except psutil.TimeoutExpired:
            continue
        except psutil.NoSuchProcess:
            return True
    return False
