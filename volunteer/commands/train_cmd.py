"""`volunteer train`: collaborative training through the local daemon.

- `create DATA`: the daemon announces a job training its model on DATA (token ids in a
  .npy file, or text its tokenizer reads) and drives it;
- `join [--creator PEER] [--stage N]`: the daemon becomes a stage peer of a job;
- `status`: the job, stage, steps, loss curve, peers per stage and bans;
- `leave`: the daemon ends its training role.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import pydantic

from volunteer.commands.daemon_call import ask_daemon, print_json
from volunteer.control.messages import (
    TRAIN_CREATE,
    TRAIN_JOIN,
    TRAIN_LEAVE,
    TRAIN_STATUS,
    TrainCreateRequest,
    TrainingStatus,
    TrainJoinParams,
    first_problem,
)
from volunteer.errors import SettingsError
from volunteer.paths import Paths
from volunteer.transport.protocol import printable

CALL_TIMEOUT_S = 120.0
"""Joining loads a stage's blocks; creating reads the data."""
CURVE_POINTS = 24


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train the swarm's model together (SWARM stages, Byzantine-tolerant averaging)",
        description="Create, join, watch or leave a collaborative training job through the "
        "local daemon.",
    )
    actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    create = actions.add_parser("create", help="announce and drive a job on DATA")
    create.add_argument("data", help="token ids (.npy, rows of --sequence-length + 1) or text")
    defaults = TrainCreateRequest(data="/")
    for name in ("stages", "steps", "batch_size", "microbatch_size", "sequence_length",
                 "checks", "min_peers", "seed"):  # fmt: skip
        create.add_argument(
            f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name)
        )
    create.add_argument("--lr", type=float, default=defaults.lr)
    create.add_argument("--tau", type=float, default=defaults.tau, help="CenteredClip's radius")
    create.add_argument("--optimizer", choices=("adamw", "sgd"), default=defaults.optimizer)
    create.add_argument(
        "--aggregation", choices=("mean", "centered-clip"), default=defaults.aggregation
    )
    create.add_argument(
        "--no-rebalance", dest="rebalance", action="store_false",
        help="keep peers in the stages they joined",
    )  # fmt: skip
    join = actions.add_parser("join", help="become a stage peer of a job")
    join.add_argument("--creator", help="the job's creator (peer id); default: the only job")
    join.add_argument("--stage", type=int, help="default: the stage with the fewest peers")
    actions.add_parser("status", help="the daemon's training role")
    actions.add_parser("leave", help="end the daemon's training role")
    for action in actions.choices.values():
        action.add_argument("--json", action="store_true", help="print the reply as JSON")
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, paths: Paths) -> int:
    try:
        if args.action == "create":
            fields = {
                name: getattr(args, name)
                for name in TrainCreateRequest.model_fields
                if name != "data" and hasattr(args, name)
            }
            data = str(Path(args.data).expanduser().resolve())  # the daemon's cwd is not ours
            reply = ask_daemon(
                paths, TRAIN_CREATE, CALL_TIMEOUT_S, TrainCreateRequest(data=data, **fields)
            )
        elif args.action == "join":
            params = TrainJoinParams(creator=args.creator, stage=args.stage)
            reply = ask_daemon(paths, TRAIN_JOIN, CALL_TIMEOUT_S, params)
        elif args.action == "leave":
            reply = ask_daemon(paths, TRAIN_LEAVE, CALL_TIMEOUT_S)
        else:
            reply = ask_daemon(paths, TRAIN_STATUS, CALL_TIMEOUT_S)
    except pydantic.ValidationError as exc:
        raise SettingsError(first_problem(exc)) from None
    if args.json:
        print_json(reply)
    else:
        print("\n".join(describe(reply)))
    return 0


def describe(status: TrainingStatus) -> list[str]:
    """`train status` in lines (the TUI's training panel says the same)."""
    if status.training_role is None:
        return ["not training: `volunteer train create DATA` or `volunteer train join`"]
    lines = [
        f"role      {status.training_role} ({status.training_state})",
        f"job       {status.training_job} by {status.training_creator}",
        f"steps     {status.training_step} of {status.training_steps}",
    ]
    if status.training_stage is not None and status.training_blocks is not None:
        start, end = status.training_blocks
        lines.append(f"stage     {status.training_stage} (blocks {start}:{end})")
    if status.training_stage_peers:
        lines.append("peers     " + ", ".join(
            f"stage {i}: {n}" for i, n in enumerate(status.training_stage_peers)
        ))  # fmt: skip
    if status.training_loss is not None:
        lines.append(f"loss      {status.training_loss:.4f}  {sparkline(status.training_losses)}")
    if status.training_samples_per_s is not None:
        lines.append(f"speed     {status.training_samples_per_s:.2f} sequences/s")
    if status.training_banned:
        lines.append("banned    " + ", ".join(status.training_banned))
    if status.training_error:
        lines.append(f"error     {printable(status.training_error, max_chars=300)}")
    return lines


def sparkline(points: list[tuple[int, float]]) -> str:
    """The latest losses as a line of block characters, low to high."""
    values = [value for _, value in points[-CURVE_POINTS:]]
    if not values:
        return ""
    low, high = min(values), max(values)
    bars = "▁▂▃▄▅▆▇█"
    span = (high - low) or 1.0
    return "".join(bars[min(7, int((v - low) / span * 8))] for v in values)
