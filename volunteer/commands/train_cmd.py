"""`volunteer train`: collaborative training through the local daemon.

- `create DATA`: the daemon announces a job training its model on DATA (token ids in a
  .npy file, or text its tokenizer reads) and drives it;
- `join [--creator PEER] [--stage N]`: the daemon becomes a stage peer of a job;
- `standby [DATA] [--creator PEER]`: the daemon, named a backup driver of a job
  (`create --backup PEER`), holds its data (or fetches it from the driver) and drives
  the job on if its driver is gone;
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
    TRAIN_STANDBY,
    TRAIN_STATUS,
    TrainCreateRequest,
    TrainJoinParams,
    TrainStandbyParams,
    first_problem,
)
from volunteer.control.training_view import training_lines
from volunteer.errors import SettingsError
from volunteer.paths import Paths

CALL_TIMEOUT_S = 120.0
"""Joining loads a stage's blocks; creating reads the data."""
FETCH_TIMEOUT_S = 1800.0
"""A backup fetching the job's data: up to 1 GiB over the swarm."""


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
                 "checks", "min_peers", "seed", "shards"):  # fmt: skip
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
        "--lora-rank", type=int, help="train LoRA adapters of this rank (default: the blocks)"
    )
    create.add_argument(
        "--save-as", metavar="NAME",
        help="the result's name when the job is done: a LoRA job's adapter, or a model "
        "folder under <data dir>/trained (default: train-<job id>)",
    )  # fmt: skip
    create.add_argument(
        "--no-rebalance", dest="rebalance", action="store_false",
        help="keep peers in the stages they joined",
    )  # fmt: skip
    create.add_argument(
        "--backup", dest="backups", metavar="PEER", action="append", default=[],
        help="a daemon (peer id) that may drive the job on if this one is gone for good; "
        "repeat for more, in order (each runs `volunteer train standby DATA`)",
    )  # fmt: skip
    standby = actions.add_parser(
        "standby", help="hold a job's data and drive it on if its driver is gone"
    )
    standby.add_argument(
        "data", nargs="?",
        help="the job's data on this machine (default: fetched from the driver, each shard "
        "checked against the job's hash)",
    )  # fmt: skip
    standby.add_argument("--creator", help="the job's creator (peer id); default: the job naming "
                         "this daemon a backup")  # fmt: skip
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
            request = TrainCreateRequest(data=_absolute(args.data), **fields)
            reply = ask_daemon(paths, TRAIN_CREATE, CALL_TIMEOUT_S, request)
        elif args.action == "standby":
            data = _absolute(args.data) if args.data else None
            params = TrainStandbyParams(data=data, creator=args.creator)
            timeout_s = CALL_TIMEOUT_S if data else FETCH_TIMEOUT_S
            reply = ask_daemon(paths, TRAIN_STANDBY, timeout_s, params)
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
        print("\n".join(training_lines(reply)))
    return 0


def _absolute(data: str) -> str:
    """The data file's absolute path: the daemon's working folder is not ours."""
    return str(Path(data).expanduser().resolve())
