"""The daemon's main coroutine: pid file, control API, services, graceful shutdown.

`run_daemon` owns the one event loop's work. Services (the DHT, the block server, chat)
are started in order and stopped in reverse order, so the block server can announce
OFFLINE while its DHT is still up. Each service reports its part of the `status` reply
(`volunteer.control.messages`), which the daemon assembles. States::

    joining --(every service started)--> serving --(stop / SIGTERM / SIGINT)--> stopping
       └--(a service failed to start)--> failed
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import logging.handlers
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from volunteer import __version__
from volunteer.control import lifecycle
from volunteer.control.messages import (
    RELOAD,
    STATUS,
    STOP,
    DaemonState,
    DaemonStatus,
    NoParams,
    ReloadReply,
    Reply,
    StatusReply,
    StopParams,
    StopReply,
)
from volunteer.control.server import ControlServer
from volunteer.errors import SettingsError, VolunteerError
from volunteer.paths import Paths
from volunteer.settings import APPLIED_LIVE, Settings, changed_fields

logger = logging.getLogger(__name__)

SERVICE_STOP_TIMEOUT_S = 15.0
"""Longest wait for one service to stop before the daemon moves on."""


class Service(Protocol):
    """A part of the daemon with a start, a stop and a status."""

    async def start(self) -> None:
        """Starts serving; raises to make the daemon fail with the error's text."""

    async def stop(self) -> None:
        """Stops; must not raise for a service that never fully started."""

    def status(self) -> Reply:
        """The service's part of the daemon's `status` reply."""


class _Daemon:
    """The state `run_daemon` shares with the control methods and signal handlers."""

    def __init__(
        self,
        settings: Settings,
        services: Sequence[Service],
        reload: Callable[[], tuple[Settings, Settings]] | None,
    ) -> None:
        self.settings = settings
        self.services = list(services)
        self.reload = reload
        self.restart_needed: list[str] = []
        """Settings changed in the config that only a restart applies."""
        self.state: DaemonState = "joining"
        self.error: str | None = None
        self.started_at_s = time.monotonic()
        self.stop_requested = asyncio.Event()

    async def reload_config(self, params: NoParams) -> ReloadReply:
        """Control method: reads the settings again (config.toml under the daemon's own
        environment and flags), applies what a running daemon can (`APPLIED_LIVE`) and
        says what needs a restart, and which edits of the file an env variable or a flag
        overrides."""
        if self.reload is None:
            raise SettingsError("this daemon was started without a way to reload settings")
        wanted, from_file = self.reload()  # SettingsError: a bad file, answered as such
        changed = changed_fields(self.settings, wanted)
        live = [name for name in changed if name in APPLIED_LIVE]
        if live:
            applied = dataclasses.replace(self.settings, **{n: getattr(wanted, n) for n in live})
            for service in self.services:
                apply = getattr(service, "apply_settings", None)
                if apply is not None:
                    await apply(applied)
            self.settings = applied
            logger.info("settings applied: %s", ", ".join(live))
        self.restart_needed = [name for name in changed if name not in APPLIED_LIVE]
        if self.restart_needed:
            logger.info("settings that apply on restart: %s", ", ".join(self.restart_needed))
        # What the file sets (not left at the default) that the daemon's flags or env beat.
        overridden = [
            field.name
            for field in dataclasses.fields(Settings)
            if getattr(from_file, field.name) not in (field.default, getattr(wanted, field.name))
        ]
        return ReloadReply(applied=live, restart_needed=self.restart_needed, overridden=overridden)

    async def status(self, params: NoParams) -> StatusReply:
        """Control method: the daemon's state and every service's part."""
        own = DaemonStatus(
            state=self.state,
            error=self.error,
            pid=os.getpid(),
            version=__version__,
            uptime_s=round(time.monotonic() - self.started_at_s, 3),
            model=self.settings.model,
            public_name=self.settings.public_name,
            restart_needed=self.restart_needed,
            faults=str(self.settings.faults) or None,
        )
        return StatusReply.assemble(own, [service.status() for service in self.services])

    async def stop(self, params: StopParams) -> StopReply:
        """Control method: a graceful stop (the services stop in reverse order); with
        `now`, or when a stop is under way already, without hand-over grace."""
        self.request_stop(now=params.now)
        grace_s = 0.0 if params.now else max(map(_grace_s, self.services), default=0.0)
        return StopReply(grace_s=grace_s)

    def request_stop(self, *, now: bool = False) -> None:
        """Starts a graceful stop; a second request (or `now`) hurries it: services
        that hand work over first (`hurry`) leave at once."""
        if now or self.stop_requested.is_set():
            for service in self.services:
                hurry = getattr(service, "hurry", None)
                if hurry is not None:
                    hurry()
        self.stop_requested.set()


async def run_daemon(
    settings: Settings,
    paths: Paths,
    services: Sequence[Service],
    *,
    log_to_stderr: bool = True,
    reload: Callable[[], tuple[Settings, Settings]] | None = None,
) -> int:
    """Runs the daemon until it is asked to stop.

    Args:
        settings: the validated settings.
        paths: the instance's folders (pid file, socket, logs).
        services: started in order, stopped in reverse order.
        log_to_stderr: also log to stderr (foreground runs); the log file is always kept.
        reload: reads the settings again, returning them as the daemon would now start
            with them and as `config.toml` alone has them (the `reload_config` method).

    Returns:
        The process exit code: 0 after a graceful stop, 1 when starting failed.

    Raises:
        VolunteerError: another daemon already runs with this home.
    """
    configure_logging(settings, paths, log_to_stderr=log_to_stderr)
    other = lifecycle.running_daemon(paths)
    if other is not None and other != os.getpid():
        raise VolunteerError(f"already running (pid {other})")
    lifecycle.write_pid_file(paths)
    daemon = _Daemon(settings, services, reload)
    control = ControlServer(paths)
    control.register(STATUS, daemon.status)
    control.register(STOP, daemon.stop)
    control.register(RELOAD, daemon.reload_config)
    for service in services:
        # Optional: services with control methods of their own (chat) add them here.
        register = getattr(service, "register_control", None)
        if register is not None:
            register(control)
    try:
        await control.start()
        with _signals_set(daemon.request_stop):
            return await _serve(daemon)
    finally:
        await control.close()
        lifecycle.remove_pid_file(paths, os.getpid())
        logger.info("daemon exited")


async def _serve(daemon: _Daemon) -> int:
    started: list[Service] = []
    startup = asyncio.create_task(_start_all(daemon.services, started))
    stop_wait = asyncio.create_task(daemon.stop_requested.wait())
    try:
        await asyncio.wait({startup, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stop_wait.cancel()
    code = 0
    if not startup.done():
        logger.info("stop requested while starting")
        startup.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await startup
    elif startup.exception() is not None:
        exc = startup.exception()
        daemon.state, daemon.error = "failed", f"{type(exc).__name__}: {exc}"
        logger.error("daemon failed: %s", daemon.error, exc_info=exc)
        print(f"volunteer: error: daemon failed: {daemon.error}", file=sys.stderr, flush=True)
        code = 1
    else:
        daemon.state = "serving"
        logger.info("serving")
        await daemon.stop_requested.wait()
    if code == 0:
        daemon.state = "stopping"
    await _stop_all(started)
    return code


async def _start_all(services: Sequence[Service], started: list[Service]) -> None:
    for service in services:
        # Recorded before start() returns: a half-started service is stopped too.
        started.append(service)
        await service.start()


async def _stop_all(started: list[Service]) -> None:
    for service in reversed(started):
        try:
            timeout_s = SERVICE_STOP_TIMEOUT_S + _grace_s(service)
            await asyncio.wait_for(service.stop(), timeout=timeout_s)
        except Exception:  # one service failing to stop must not keep the others up
            logger.exception("stopping %s failed", type(service).__name__)


def _grace_s(service: Service) -> float:
    """How much longer than others a service may take to stop (a hand-over's grace)."""
    return float(getattr(service, "stop_grace_s", 0.0))


@contextlib.contextmanager
def _signals_set(request_stop: Callable[[], None]) -> Iterator[None]:
    """SIGTERM and SIGINT call `request_stop` (a graceful stop; a second one hurries
    it) while the block runs."""
    loop = asyncio.get_running_loop()
    names = [signal.SIGTERM, signal.SIGINT]
    installed = []
    for signum in names:
        try:
            loop.add_signal_handler(signum, request_stop)
            installed.append(signum)
        except (NotImplementedError, RuntimeError):
            # Windows: no loop signal handlers; signal.signal runs in the main thread.
            signal.signal(signum, lambda *_: loop.call_soon_threadsafe(request_stop))
    try:
        yield
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)


def configure_logging(settings: Settings, paths: Paths, *, log_to_stderr: bool) -> None:
    """Sends the daemon's logs to a rotating file (and stderr when asked); the logs are
    private (they name peers, models and the person's own addresses)."""
    _make_logs_private(paths)
    root = logging.getLogger()
    root.setLevel(settings.log_level)
    formatter = logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
    handlers: list[logging.Handler] = [
        logging.handlers.RotatingFileHandler(
            paths.daemon_log, maxBytes=5_000_000, backupCount=3, encoding="utf-8"
        )
    ]
    if log_to_stderr:
        handlers.append(logging.StreamHandler(sys.stderr))
    for handler in handlers:
        handler.setFormatter(formatter)
        root.addHandler(handler)


def _make_logs_private(paths: Paths) -> None:
    """Makes the log folder 0700 and its files 0600, also those an older version left
    readable; new files follow the daemon's private umask."""
    paths.log_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    if os.name != "posix":
        return
    paths.log_dir.chmod(0o700)
    for path in paths.log_dir.iterdir():
        if path.is_file():
            path.chmod(0o600)
