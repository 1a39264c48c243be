"""A block server in a process of its own, for tests that stop it as a vanished host stops,
or that need its torch threads to be its own.

Run as `python -m tests.client.server_process START END [INITIAL_PEER ...]` from the
repository root: it serves blocks [START, END) of the tests' tiny random model (the same
weights as `random_span(tiny_config())` in the test), prints one JSON line with its peer
id and addresses once it serves, and serves until its stdin closes. Options:
`--threads N` runs its compute on N torch threads (decode steps too), `--cache-tokens N`
and `--max-chunk N` set its cache budget and the most positions of a step.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from hivemind.p2p import P2P

from tests.server import random_span, sub_span, tiny_config
from volunteer.server.handler import BlockHandler

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def serve(
    start: int,
    end: int,
    initial_peers: list[str],
    *,
    threads: int | None = None,
    cache_tokens: int = 64,
    max_chunk: int = 8,
) -> None:
    p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=initial_peers)
    handler = await BlockHandler.create(
        p2p=p2p,
        span=sub_span(random_span(tiny_config()), start, end),
        model_name="tiny",
        cache_tokens=cache_tokens,
        max_batch=1,
        max_chunk=max_chunk,
        threads=threads,
        decode_threads=threads,
    )
    maddrs = [str(addr) for addr in await p2p.get_visible_maddrs()]
    print(json.dumps({"peer_id": p2p.peer_id.to_base58(), "maddrs": maddrs}), flush=True)
    try:
        # Until the test closes our stdin (or kills the process group).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await handler.shutdown()
        await p2p.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description="A block server of the tests' tiny model.")
    parser.add_argument("start", type=int)
    parser.add_argument("end", type=int)
    parser.add_argument("initial_peers", nargs="*")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-tokens", type=int, default=64)
    parser.add_argument("--max-chunk", type=int, default=8)
    args = parser.parse_args()
    serving = serve(
        args.start,
        args.end,
        args.initial_peers,
        threads=args.threads,
        cache_tokens=args.cache_tokens,
        max_chunk=args.max_chunk,
    )
    asyncio.run(serving)


if __name__ == "__main__":
    main()
