"""A block server in a process of its own, for tests that stop it as a vanished host stops.

Run as `python -m tests.client.server_process START END [INITIAL_PEER ...]` from the
repository root: it serves blocks [START, END) of the tests' tiny random model (the same
weights as `random_span(tiny_config())` in the test), prints one JSON line with its peer
id and addresses once it serves, and serves until its stdin closes.
"""

from __future__ import annotations

import asyncio
import json
import sys

from hivemind.p2p import P2P

from tests.server import random_span, sub_span, tiny_config
from volunteer.server.handler import BlockHandler

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def serve(start: int, end: int, initial_peers: list[str]) -> None:
    p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=initial_peers)
    handler = await BlockHandler.create(
        p2p=p2p,
        span=sub_span(random_span(tiny_config()), start, end),
        model_name="tiny",
        cache_tokens=64,
        max_batch=1,
        max_chunk=8,
    )
    maddrs = [str(addr) for addr in await p2p.get_visible_maddrs()]
    print(json.dumps({"peer_id": p2p.peer_id.to_base58(), "maddrs": maddrs}), flush=True)
    try:
        # Until the test closes our stdin (or kills the process group).
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    finally:
        await handler.shutdown()
        await p2p.shutdown()


if __name__ == "__main__":
    asyncio.run(serve(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]))
