"""`volunteer start | stop | reload | status`: the background daemon that lends this machine."""

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
from volunteer.paths import Paths
from volunteer.settings import APPLIED_LIVE, SPECS, Settings, SettingSpec

EXIT_NOT_RUNNING = 3
"""`status` exit code when no daemon runs (as LSB init scripts use it)."""


def register(subparsers: Any) -> None:
    """Adds `start`, `stop`, `reload` and `status` to the CLI."""
    start = subparsers.add_parser(
        "start",
        help="start the daemon in the background",
        description="Join (or start) a swarm and serve model blocks. Options also come from "
        "config.toml and VOLUNTEER_* environment variables; flags win.",
    )
    for spec in SPECS:
        _add_flag(start, spec)
    start.add_argument("--foreground", action="store_true", help="stay attached; log to stderr")
    # Set by `start_background` for the child it spawns: its stderr is a log file.
    start.add_argument("--detached", action="store_true", help=argparse.SUPPRESS)
    start.set_defaults(handler=run_start)

    stop = subparsers.add_parser(
        "stop",
        help="stop the daemon; it leaves the swarm cleanly, first handing over blocks "
        "that no other server holds (at most --leave-grace seconds)",
    )
    stop.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="then kill it (30, beyond the hand-over's grace)",
    )
    stop.add_argument(
        "--now", action="store_true", help="leave at once, without handing blocks over"
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
    flags = settings_flags(args)
    settings = Settings.build(paths=paths, env=os.environ, flags=flags)
    if args.foreground:
        # Before the daemon creates anything: its files and sockets are private, and a
        # second start on this home fails here (AlreadyRunningError) having touched nothing.
        lifecycle.use_private_umask()
        with lifecycle.daemon_lock(paths):
            from volunteer.daemon.main import run_foreground  # torch and hivemind: only here

            return run_foreground(
                settings, paths=paths, env=os.environ, flags=flags, log_to_stderr=not args.detached
            )
    child_argv = [*_home_argv(args), "start", "--foreground", "--detached", *flags_argv(flags)]
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
    result = lifecycle.stop(paths, timeout_s=args.timeout, now=args.now)
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


def _add_flag(parser: argparse.ArgumentParser, spec: SettingSpec) -> None:
    # Values stay text (None: not given): Settings.build checks them like env values.
    if spec.flag_kind == "switch":
        parser.add_argument(
            spec.flag, dest=spec.name, action="store_const", const=True, help=spec.help
        )
        return
    action = "append" if spec.flag_kind == "append" else "store"
    parser.add_argument(
        spec.flag, dest=spec.name, action=action, metavar=spec.metavar, help=spec.help
    )


def settings_flags(args: argparse.Namespace) -> dict[str, Any]:
    """The settings' flags of a parsed `volunteer start`, by setting name (None: not given)."""
    return {spec.name: getattr(args, spec.name) for spec in SPECS}


def flags_argv(flags: dict[str, Any]) -> list[str]:
    """The flags as given, for the child; it layers file and env the same way we did."""
    argv = []
    for spec in SPECS:
        value = flags.get(spec.name)
        if value is None:
            continue
        if spec.flag_kind == "switch":
            argv.append(spec.flag)
        elif spec.flag_kind == "append":
            argv.extend(f"{spec.flag}={item}" for item in value)
        else:
            argv.append(f"{spec.flag}={value}")
    return argv


def _home_argv(args: argparse.Namespace) -> list[str]:
    # Without --home the child resolves the same folders from the inherited environment.
    return ["--home", str(Path(args.home).expanduser().resolve())] if args.home else []


def _holes(status: StatusReply) -> str:
    """The swarm's hole seen last, the ones this server filled, and its own hand-over."""
    seen = f"blocks {status.swarm_hole} unserved" if status.swarm_hole else "none seen"
    leaving = "; handing its blocks over before it leaves" if status.leaving else ""
    return f"{seen}; {status.hole_moves} filled by moving here{leaving}"


def _credit(status: StatusReply) -> str:
    """This daemon's credit by its receipts, and its rank on the board it audited."""
    if status.credit_total is None:
        return "-"
    rank = f"rank {status.credit_rank} of {status.board_size}" if status.credit_rank else "unranked"
    held = f", {status.credit_held:.2f} held in escrow" if status.credit_held else ""
    return (
        f"{status.credit_total:.2f} total, {status.credit_recent:.2f}/day recent{held}; "
        f"{rank}; {status.receipts_kept} receipts ({status.receipts_refused} refused)"
    )


def _api(status: StatusReply) -> str:
    if status.api_url is None:
        return "off (--api [HOST:]PORT serves it)"
    return (
        f"{status.api_url}: {status.api_requests} requests, {status.api_active} generating "
        "(key: `volunteer api-token`)"
    )


def _training(status: StatusReply) -> str:
    if status.training_role is None:
        return "none (`volunteer train` creates or joins a job)"
    where = f", stage {status.training_stage}" if status.training_stage is not None else ""
    loss = f", loss {status.training_loss:.4f}" if status.training_loss is not None else ""
    return (
        f"{status.training_role} of job {status.training_job}{where} ({status.training_state}): "
        f"step {status.training_step} of {status.training_steps}{loss}"
    )


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
        ("owner's rules", status.owner_rules),
        ("OpenAI API", _api(status)),
        ("holes", _holes(status)),
        (
            "peers seen",
            f"{status.peers_seen}{' (partitioned: redialling)' * status.is_partitioned}",
        ),
        ("requests served", status.requests_served),
        (
            "checks",
            f"{status.checks_passed} passed, {status.checks_failed} failed, "
            f"{status.peers_banned} of {status.peers_checked} checked peers banned",
        ),
        (
            "accusations",
            f"{status.accusations_filed} filed, {status.accusations_upheld} upheld, "
            f"{status.accusations_refuted} refuted",
        ),
        ("tokens served", status.tokens_served),
        ("steps batched", f"{status.steps_batched} (largest batch {status.largest_batch})"),
        ("credit", _credit(status)),
        ("training", _training(status)),
        ("uptime", _format_uptime(status.uptime_s)),
        ("peer id", status.peer_id),
    ]
    if status.restart_needed:
        rows.append(("restart needed", ", ".join(status.restart_needed)))
    if status.faults:
        rows.append(("DRILL faults", f"{status.faults} (answers wrong on purpose)"))
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
