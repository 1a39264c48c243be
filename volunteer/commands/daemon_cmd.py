"""`volunteer start | stop | status`: the background daemon that lends this machine."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from volunteer.control import lifecycle
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import DaemonNotRunningError
from volunteer.control.messages import RELOAD, STATUS, StatusReply
from volunteer.model_cache.smollm2 import DEFAULT_MODEL
from volunteer.paths import Paths
from volunteer.settings import APPLIED_LIVE, Settings, flag_name, read_config

EXIT_NOT_RUNNING = 3
"""`status` exit code when no daemon runs (as LSB init scripts use it)."""

# (flag, settings field, metavar, help); all values are validated by Settings.build.
_VALUE_FLAGS = (
    ("--model", "model", "NAME", f"model to serve (default: {DEFAULT_MODEL})"),
    ("--blocks", "blocks", "START:END", "serve exactly blocks [START, END)"),
    ("--num-blocks", "num_blocks", "N", "serve N blocks where the swarm needs them (0: none)"),
    ("--host", "host", "IP", "address to listen on (default: 127.0.0.1, this machine only)"),
    ("--port", "port", "PORT", "TCP port to listen on (default: 0, any free port)"),
    ("--public-name", "public_name", "NAME", "your name on the leaderboard"),
    ("--cache-tokens", "cache_tokens", "N", "attention cache budget in tokens (default: auto)"),
    ("--threads", "threads", "N", "torch threads (default: all cores)"),
    ("--max-ram-gib", "max_ram_gib", "GIB", "most RAM the blocks and caches may take"),
    ("--max-gpu-gib", "max_gpu_gib", "GIB", "most GPU memory an offloading plan may take"),
    (
        "--local-links",
        "local_links",
        "yes|no",
        "serve this machine's other swarm processes on a Unix socket, past p2pd (yes)",
    ),
    (
        "--rebalance-period",
        "rebalance_period_s",
        "SECONDS",
        "mean time between checks whether to move to weaker blocks (600; 0: never)",
    ),
    ("--log-level", "log_level", "LEVEL", "DEBUG, INFO (default), WARNING or ERROR"),
    ("--start-timeout", "start_timeout_s", "SECONDS", "how long to wait for serving (120)"),
)


def register(subparsers: Any) -> None:
    """Adds `start`, `stop` and `status` to the CLI."""
    start = subparsers.add_parser(
        "start",
        help="start the daemon in the background",
        description="Join (or start) a swarm and serve model blocks. Options also come from "
        "config.toml and VOLUNTEER_* environment variables; flags win.",
    )
    for flag, dest, metavar, help_text in _VALUE_FLAGS:
        start.add_argument(flag, dest=dest, metavar=metavar, help=help_text)
    start.add_argument(
        "--join",
        action="append",
        metavar="MULTIADDR",
        help="a peer of the swarm to join (repeatable)",
    )
    start.add_argument(
        "--new-swarm",
        action="store_const",
        const=True,
        help="start a new swarm instead of joining one",
    )
    start.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")
    # Set by `start_background` for the child it spawns: its stderr is a log file.
    start.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    start.set_defaults(handler=run_start)

    stop = subparsers.add_parser("stop", help="stop the daemon; it leaves the swarm cleanly")
    stop.add_argument(
        "--timeout", type=float, default=30.0, metavar="SECONDS", help="then kill it (30)"
    )
    stop.set_defaults(handler=run_stop)

    reload = subparsers.add_parser(
        "reload",
        help="have the daemon read config.toml again",
        description=f"The daemon takes on what it can while serving ({', '.join(APPLIED_LIVE)}) "
        "and says which changes wait for a restart (`volunteer stop` then `start`).",
    )
    reload.set_defaults(handler=run_reload)

    status = subparsers.add_parser("status", help="show what the daemon is doing")
    status.add_argument("--json", action="store_true", help="print the full status as JSON")
    status.set_defaults(handler=run_status)


def run_start(args: argparse.Namespace, paths: Paths) -> int:
    """Starts the daemon, in the foreground or detached."""
    flags = _settings_flags(args)
    settings = Settings.build(paths=paths, env=os.environ, flags=flags)
    if args.foreground:
        return _run_foreground(settings, paths, flags, log_to_stderr=not args.detached)
    child_argv = [*_home_argv(args), "start", "--foreground", "--detached", *_flags_argv(flags)]
    result = lifecycle.start_background(paths, child_argv, timeout_s=settings.start_timeout_s)
    if result.outcome != "serving":
        print(f"volunteer: {result.message}", file=sys.stderr)
        if result.outcome == "failed":
            print(f"(log: {lifecycle.output_file(paths)})", file=sys.stderr)
        return 1
    assert result.status is not None  # a daemon says it serves in its status
    print(f"volunteer: serving (pid {result.pid}), peer id {result.status.peer_id}")
    print("others join with:")
    for maddr in result.status.multiaddrs:
        print(f"  volunteer start --join {maddr}")
    return 0


def run_stop(args: argparse.Namespace, paths: Paths) -> int:
    """Stops the daemon gracefully (it announces leaving the swarm first)."""
    result = lifecycle.stop(paths, timeout_s=args.timeout)
    if result.outcome == "not_running":
        print("volunteer: not running")
    else:
        print(f"volunteer: {result.outcome} (pid {result.pid})")
    return 0


def run_reload(args: argparse.Namespace, paths: Paths) -> int:
    """Has the daemon read its settings again; prints what it applied and what waits."""
    try:
        outcome = ControlClient(paths).call(RELOAD, timeout_s=30.0)
    except DaemonNotRunningError:
        print("volunteer: not running (config.toml applies when it starts)")
        return EXIT_NOT_RUNNING
    from volunteer.control.replies import describe_reload

    print(f"volunteer: {describe_reload(outcome)}")
    return 0


def run_status(args: argparse.Namespace, paths: Paths) -> int:
    """Prints the daemon's status; exit code 3 when it is not running.

    Raises:
        ControlError: the daemon answered with an error or a malformed status.
    """
    try:
        status = ControlClient(paths).call(STATUS, timeout_s=5.0)
    except DaemonNotRunningError:
        pid = lifecycle.running_daemon(paths)
        status = StatusReply(state="starting", pid=pid) if pid else StatusReply(state="not_running")
    if args.json:
        # The fields the daemon sent (or the few we know without it), as it named them.
        shown = status.model_dump(mode="json", exclude_unset=True)
        print(json.dumps(shown, indent=2, sort_keys=True))
    else:
        _print_table(status)
    return EXIT_NOT_RUNNING if status.state == "not_running" else 0


def _run_foreground(
    settings: Settings, paths: Paths, flags: dict[str, Any], *, log_to_stderr: bool
) -> int:
    # torch, hivemind and the event loop load here, so `status`, `stop` and --help stay fast.
    import asyncio

    from volunteer.machine.cpu_sharing import sleep_idle_threads
    from volunteer.machine.lean_imports import import_hivemind
    from volunteer.machine.memory_tuning import return_large_frees_to_the_os

    sleep_idle_threads()
    return_large_frees_to_the_os()
    import torch

    import_hivemind()

    from volunteer.chat.service import ChatService
    from volunteer.daemon.block_service import BlockService
    from volunteer.daemon.dht_service import DHTService
    from volunteer.daemon.identity import (
        load_or_create_identity,
        runtime_identity_path,
        write_private_file,
    )
    from volunteer.daemon.runner import run_daemon
    from volunteer.swarm.dht_records import make_validator, owner_marker

    # This thread (the event loop's) computes one-position decode steps at most. Torch
    # work of more threads runs on threads that set their own count (from --threads:
    # several daemons on one machine each take their share): one OpenMP team here too
    # would make libgomp let idle workers sleep at once, and prefills slow by a third
    # (see volunteer.machine.cpu_sharing.in_passing_thread).
    torch.set_num_threads(1)
    identity = load_or_create_identity(paths)
    if identity.warning:
        print(f"volunteer: warning: {identity.warning}", file=sys.stderr)
    identity_path = write_private_file(runtime_identity_path(paths), identity.p2p_identity_bytes())
    dht = DHTService(
        settings, identity_path=identity_path, record_validator=make_validator(identity.private_key)
    )
    blocks = BlockService(settings, paths, dht, owner=owner_marker(identity.private_key))
    # Started in this order, stopped in reverse: the blocks announce OFFLINE while the
    # DHT is still up.
    services = [dht, blocks, ChatService(settings, paths, dht, blocks)]

    def reload() -> tuple[Settings, Settings]:
        # The environment and flags it started with still win over the file.
        return Settings.build(paths=paths, env=os.environ, flags=flags), read_config(paths)

    return asyncio.run(
        run_daemon(settings, paths, services, log_to_stderr=log_to_stderr, reload=reload)
    )


def _settings_flags(args: argparse.Namespace) -> dict[str, Any]:
    names = [dest for _, dest, _, _ in _VALUE_FLAGS] + ["join", "new_swarm"]
    return {name: getattr(args, name) for name in names}


def _flags_argv(flags: dict[str, Any]) -> list[str]:
    """The flags as given, for the child; it layers file and env the same way we did."""
    argv = []
    for name, value in flags.items():
        flag = flag_name(name)
        if value is None:
            continue
        if name == "new_swarm":
            argv.append(flag)
        elif name == "join":
            argv.extend(f"--join={maddr}" for maddr in value)
        else:
            argv.append(f"{flag}={value}")
    return argv


def _home_argv(args: argparse.Namespace) -> list[str]:
    # Without --home the child resolves the same folders from the inherited environment.
    return ["--home", str(Path(args.home).expanduser().resolve())] if args.home else []


def _print_table(status: StatusReply) -> None:
    if status.state == "not_running":
        print("volunteer: not running")
        return
    blocks = status.blocks
    rows = [
        ("state", status.state + (f" ({status.error})" if status.error else "")),
        ("pid", status.pid),
        ("model", status.model),
        ("blocks", f"{blocks[0]}:{blocks[1]}" if blocks else "-"),
        ("why these", status.span_reason),
        ("last rebalance", status.last_rebalance_check),
        ("peers seen", status.peers_seen),
        ("requests served", status.requests_served),
        ("tokens served", status.tokens_served),
        ("uptime", _format_uptime(status.uptime_s)),
        ("peer id", status.peer_id),
    ]
    if status.restart_needed:
        rows.append(("restart needed", ", ".join(status.restart_needed)))
    for label, value in rows:
        print(f"{label:<16} {'-' if value is None else value}")
    for index, maddr in enumerate(status.multiaddrs):
        print(f"{'multiaddrs' if index == 0 else '':<16} {maddr}")


def _format_uptime(uptime_s: float | None) -> str:
    if uptime_s is None:
        return "-"
    minutes, seconds = divmod(int(uptime_s), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h {minutes:02d}m {seconds:02d}s" if hours else f"{minutes}m {seconds:02d}s"
