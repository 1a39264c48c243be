"""`volunteer api-token`: the bearer token of the daemon's OpenAI API (made on first use,
kept with the peer identity)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from volunteer.paths import Paths


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "api-token",
        help="the bearer token of the OpenAI API (`volunteer start --api PORT`)",
        description="Prints the token OpenAI clients send as their API key "
        "(`Authorization: Bearer <token>`). It is made on first use and kept in the OS "
        "keyring, or where none exists in a 0600 file of the data folder (said on stderr).",
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace, paths: Paths) -> int:
    # Here, not at the top: the identity module loads hivemind (and torch), which the
    # CLI must not load before the daemon has set up its threads.
    from volunteer.daemon.api_token import load_or_create_api_token

    token = load_or_create_api_token(paths)
    print(token.value)
    if token.stored_in != "keyring":
        where = f"volunteer: kept in {token.stored_in} (mode 0600): no OS keyring here"
        print(where, file=sys.stderr)
    return 0
