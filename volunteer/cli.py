"""`volunteer` command line: global options, then one subcommand per job.

Settings are built once here and passed down; nothing below reads the environment.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from volunteer import __version__
from volunteer.commands import (
    adapters_cmd,
    api_token_cmd,
    chat,
    daemon_cmd,
    finetune_cmd,
    leaderboard_cmd,
    models_cmd,
    peers_cmd,
    profile_cmd,
    service_cmd,
    train_cmd,
    tui_cmd,
)
from volunteer.errors import VolunteerError
from volunteer.models.errors import ModelError
from volunteer.paths import Paths

_COMMANDS = (
    models_cmd,
    chat,
    daemon_cmd,
    finetune_cmd,
    peers_cmd,
    leaderboard_cmd,
    adapters_cmd,
    api_token_cmd,
    profile_cmd,
    service_cmd,
    train_cmd,
    tui_cmd,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="volunteer",
        description="Lend your machine to a swarm that serves and trains language models.",
    )
    parser.add_argument("--version", action="version", version=f"volunteer {__version__}")
    parser.add_argument(
        "--home",
        metavar="DIR",
        help="keep config, data, identity and logs under DIR (env: VOLUNTEER_HOME)",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _COMMANDS:
        command.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "handler", None):
        parser.print_help()
        return 2
    paths = Paths.from_environ(args.home)
    try:
        return int(args.handler(args, paths))
    except (VolunteerError, ModelError) as exc:
        print(f"volunteer: error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`volunteer models list | head`): nothing left to say.
        sys.stderr.close()
        return 1
    except OSError as exc:
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"volunteer: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
