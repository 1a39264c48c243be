"""Many users at once: concurrent chats through a 2-server swarm, batching on and off.

Two `python -m volunteer` daemons on 127.0.0.1 (the helpers of `bench/swarm_generate.py`):
"first" serves blocks 0:15 and answers the chats (its chat service, as `volunteer chat`
uses it), "second" serves 15:30. For 1, 2, 4 and 8 users chatting at once (each its own
prompt, greedy, `--tokens` new tokens at most), each user's time to first token and
tokens/s after it, and the aggregate: every user's tokens over the wall time from the
first request to the last token. Then the same swarm is started again with batching off
(`--batch-max-sessions 1 --prefill-chunk-tokens 0`) and measured the same way, in this
run: both swarms are up at once (idle daemons take next to no CPU) and take turns,
round by round. Each concurrency level runs `--rounds` times; the medians are printed.

The chats' own checks of the servers (`--verify`, off by default) recompute a share of
the steps on the chatting daemon, more for servers new to it (and every server of a
fresh swarm is): a client-side cost that batching on the servers does not touch, which
on one small machine takes CPU from the servers; `--verify sample` measures with it.
Each server computes on one thread by default (`--threads`): the two servers and the
chatting daemon share this machine's cores, and a second OpenMP thread per server then
costs more CPU in hand-offs than it saves.

Then the server alone, in this process (no client, no other server): one `BlockHandler`
of blocks 15:30 and N local sessions decoding at once, steps/s with batching on and off:
what batching gives a server whatever the rest of the route costs.

Targets (issue 22): with batching, 4 users >= 2.5x and 8 users >= 4x the single user's
aggregate tokens/s; per-user time to first token with 4 users <= 2x the single user's.

    python bench/concurrency.py [--tokens 128] [--rounds 2] [--users 1,2,4,8]
                                [--dtype auto] [--local-links yes] [--verify off]
                                [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TOPICS = [
    "a lighthouse keeper who finds a message in a bottle",
    "a robot who learns to paint",
    "a village that forgets how to sleep",
    "a cartographer mapping a city that moves",
    "two rival bakers in a mountain town",
    "a train that only runs at midnight",
    "a gardener growing a forest on the moon",
    "a clockmaker who can pause time for one minute a day",
]
BATCHING_OFF = ("--batch-max-sessions", "1", "--prefill-chunk-tokens", "0")


def _log(message: str) -> None:
    print(f"[concurrency] {message}", file=sys.stderr, flush=True)


def _chat(paths: Any, topic: str, tokens: int, verify: str) -> dict[str, float]:
    """One user's chat through the daemon's control API: began, first token, end (all
    monotonic seconds) and tokens made."""
    from volunteer.control.client import ControlClient
    from volunteer.control.messages import CHAT, ChatMessage, ChatRequest, ChatStats, ChatText

    request = ChatRequest(
        messages=[ChatMessage(role="user", content=f"Write a long story about {topic}.")],
        max_new_tokens=tokens,
        verify=verify,
    )
    began, first, made = time.monotonic(), None, 0
    for message in ControlClient(paths).call_stream(CHAT, request, timeout_s=600):
        if isinstance(message, ChatText) and first is None:
            first = time.monotonic()
        elif isinstance(message, ChatStats):
            made = message.tokens
    assert first is not None, "no token came"
    return {"began": began, "first": first, "end": time.monotonic(), "tokens": made}


def _round(paths: Any, users: int, tokens: int, verify: str) -> dict[str, float]:
    """`users` chats at once: the aggregate tokens/s, and the median user's time to
    first token and tokens/s after it."""
    results: list[dict[str, float]] = []
    failures: list[BaseException] = []

    def user(index: int) -> None:
        try:
            results.append(_chat(paths, TOPICS[index % len(TOPICS)], tokens, verify))
        except BaseException as exc:  # reported below, on the main thread
            failures.append(exc)

    threads = [threading.Thread(target=user, args=(index,)) for index in range(users)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if failures:
        raise failures[0]
    wall = max(r["end"] for r in results) - min(r["began"] for r in results)
    return {
        "aggregate_tokens_s": sum(r["tokens"] for r in results) / wall,
        "user_ttft_s": statistics.median(r["first"] - r["began"] for r in results),
        "user_tokens_s": statistics.median(
            (r["tokens"] - 1) / (r["end"] - r["first"]) for r in results
        ),
    }


def _swarm(setup: Any, args: argparse.Namespace, flags: tuple[str, ...]) -> tuple[Any, Any]:
    """A 2-server swarm of its own (batching as `flags` say), warmed; and the paths of
    the daemon that chats."""
    from volunteer.paths import Paths

    daemons = setup.daemons("batching-off" if flags else "batching-on")
    daemons.dtype = args.dtype
    daemons.start("first", "--blocks", "0:15", *flags)
    daemons.start("second", "--blocks", "15:30", *flags)
    paths = Paths.resolve(home=daemons.root / "first", env=daemons.env)
    _round(paths, 1, 8, args.verify)  # warm: the chat's ends and tokenizer load
    return daemons, paths


def _measure(swarms: dict[str, tuple[Any, Any]], args: argparse.Namespace) -> dict:
    """Each concurrency level `--rounds` times on each swarm, the swarms taking turns
    round by round (so that the machine's drift falls on both alike); the medians."""
    runs: dict[str, dict[int, list]] = {name: {} for name in swarms}
    for users in args.users:
        for _ in range(args.rounds):
            for name, (_, paths) in swarms.items():
                runs[name].setdefault(users, []).append(
                    _round(paths, users, args.tokens, args.verify)
                )
                _log(f"batching {name}, {users} users: {runs[name][users][-1]}")
    figures: dict[str, dict] = {}
    for name, by_users in runs.items():
        figures[name] = {
            users: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            for users, rounds in by_users.items()
        }
        daemons = swarms[name][0]
        figures[name]["largest_batch"] = max(
            daemons.status(each)["largest_batch"] for each in daemons.pids
        )
    return figures


def _one_server(args: argparse.Namespace) -> dict[str, dict[int, float]]:
    """The server alone, in this process: blocks 15:30 behind a real `BlockHandler`, N
    local sessions each decoding `--tokens` steps at once after a 32-position prompt;
    steps/s with batching on and off, the settings switched between rounds."""
    import asyncio
    import dataclasses

    import torch
    from hivemind.p2p import P2P
    from volunteer.models.checkpoint import load_span
    from volunteer.models.config import ModelConfig

    from volunteer.machine.weight_choice import resolve_format
    from volunteer.model_cache.smollm2 import DEFAULT_MODEL
    from volunteer.model_cache.store import ModelStore
    from volunteer.paths import Paths
    from volunteer.server.handler import BlockHandler

    folder = ModelStore(Paths.from_environ().models_dir).resolve(DEFAULT_MODEL)
    config = ModelConfig.from_hf_folder(folder)
    span = load_span(folder, config, 15, 30, fmt=resolve_format(args.dtype)).eval()
    hidden = torch.randn(1, 32, config.hidden_size)
    step = torch.randn(1, 1, config.hidden_size)

    async def run() -> dict[str, dict[int, float]]:
        p2p = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"])
        handler = await BlockHandler.create(
            p2p=p2p, span=span, model_name="bench", cache_tokens=1 << 20, threads=args.threads
        )
        caps = handler.caps
        rates: dict[str, dict[int, list[float]]] = {"on": {}, "off": {}}
        try:
            for users in args.users:
                for _ in range(args.rounds):
                    for name, most in (("on", caps.batch.max_sessions), ("off", 1)):
                        batch = dataclasses.replace(caps.batch, max_sessions=most)
                        handler.caps = dataclasses.replace(caps, batch=batch)
                        streams = [
                            await handler.open_local_stream(
                                start=15, end=30, max_length=64 + args.tokens, batch_size=1
                            )
                            for _ in range(users)
                        ]

                        async def user(stream: Any) -> None:
                            await stream.step(hidden, 0, timeout_s=600)
                            for index in range(args.tokens):
                                await stream.step(step, 32 + index, timeout_s=600)
                            await stream.close()  # as a finished reply's session does

                        began = time.perf_counter()
                        await asyncio.gather(*(user(stream) for stream in streams))
                        elapsed = time.perf_counter() - began
                        rates[name].setdefault(users, []).append(users * args.tokens / elapsed)
                        for stream in streams:
                            await stream.close()
        finally:
            await handler.shutdown()
            await p2p.shutdown()
        return {
            name: {users: statistics.median(runs) for users, runs in by_users.items()}
            for name, by_users in rates.items()
        }

    return asyncio.run(run())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per chat at most")
    parser.add_argument("--rounds", type=int, default=2, help="runs per concurrency level")
    parser.add_argument("--users", default="1,2,4,8", help="concurrency levels, comma-separated")
    parser.add_argument("--dtype", default="auto", help="the servers' weights (`--dtype`)")
    parser.add_argument("--local-links", default="yes", help="daemons talk over Unix sockets")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="each server's torch threads (1: two servers and the chat share the cores)",
    )
    parser.add_argument(
        "--verify",
        default="off",
        choices=("off", "sample", "all"),
        help="the chats' checks of the servers (off: only serving is measured)",
    )
    args = parser.parse_args()
    args.users = [int(each) for each in args.users.split(",")]
    import swarm_generate as sg  # torch and the daemon helpers: only past --help

    with tempfile.TemporaryDirectory() as tmp:
        setup = sg.embedded_setup(Path(tmp), threads=args.threads, local_links=args.local_links)
        setup.env["VOLUNTEER_MAX_CHATS"] = str(max(args.users))
        swarms: dict[str, tuple[Any, Any]] = {}
        try:
            swarms["on"] = _swarm(setup, args, ())
            swarms["off"] = _swarm(setup, args, BATCHING_OFF)
            figures = _measure(swarms, args)
        finally:
            for daemons, _ in swarms.values():
                daemons.close()
    on, off = figures["on"], figures["off"]
    one = {name: figures[args.users[0]] for name, figures in (("on", on), ("off", off))}
    header = f"{'users':>5} {'batching':>8} {'total tok/s':>12} {'x one user':>11} "
    print(f"\n{header}{'user tok/s':>11} {'user TTFT s':>12} {'TTFT x one':>11}", file=sys.stderr)
    for users in args.users:
        for name, figures in (("on", on), ("off", off)):
            row, base = figures[users], one[name]
            print(
                f"{users:>5} {name:>8} {row['aggregate_tokens_s']:>12.2f} "
                f"{row['aggregate_tokens_s'] / base['aggregate_tokens_s']:>11.2f} "
                f"{row['user_tokens_s']:>11.2f} {row['user_ttft_s']:>12.3f} "
                f"{row['user_ttft_s'] / base['user_ttft_s']:>11.2f}",
                file=sys.stderr,
            )
    for users in args.users[1:]:
        gain = on[users]["aggregate_tokens_s"] / off[users]["aggregate_tokens_s"]
        print(f"{users} users: batching gives {gain:.2f}x the aggregate of batching off",
              file=sys.stderr)  # fmt: skip
    _log("one server alone, in this process")
    server = _one_server(args)
    print(
        "\nOne server (blocks 15:30) alone: decode steps/s of N sessions at once", file=sys.stderr
    )
    print(f"{'sessions':>8} {'on':>9} {'x one':>7} {'off':>9} {'x one':>7} {'on/off':>7}",
          file=sys.stderr)  # fmt: skip
    first = args.users[0]
    for users in args.users:
        rate_on, rate_off = server["on"][users], server["off"][users]
        print(f"{users:>8} {rate_on:>9.1f} {rate_on / server['on'][first]:>7.2f} "
              f"{rate_off:>9.1f} {rate_off / server['off'][first]:>7.2f} "
              f"{rate_on / rate_off:>7.2f}", file=sys.stderr)  # fmt: skip
    print(json.dumps({"tokens": args.tokens, "rounds": args.rounds, "verify": args.verify,
                      "on": on, "off": off, "one_server_steps_s": server}))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
