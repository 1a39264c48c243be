"""The OpenAI API against `volunteer chat`'s own path, on one daemon, in the same run.

One daemon (a new swarm serving all of the model, `--api` on a free loopback port)
answers the same greedy prompt in turns: through the control API's `chat` stream (what
`volunteer chat` uses) and through the OpenAI API with the official `openai` client,
streaming. For each: time to first token and tokens/s of the generation after it (the
median of `--rounds`); the API's speed as a share of chat's (target: >= 0.95): its
tokens/s over chat's, and chat's time to first token over its. The time to first token
is also taken over plain HTTP (no client library): the daemon's part without the
`openai` client's own parsing. Then `--streams` concurrent API streams: their total
tokens/s against one stream's.

    python bench/api.py [--model NAME] [--tokens 96] [--rounds 3] [--streams 4]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def _log(message: str) -> None:
    print(f"[api] {message}", file=sys.stderr, flush=True)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "volunteer", "--home", str(home), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def _via_chat(home: Path, tokens: int) -> tuple[float, float]:
    """TTFT and tokens/s after it, through the control API's chat stream."""
    from volunteer.control.client import ControlClient
    from volunteer.control.messages import CHAT, ChatMessage, ChatRequest, ChatStats, ChatText
    from volunteer.paths import Paths

    client = ControlClient(Paths.resolve(home=home, env=dict(os.environ)))
    request = ChatRequest(
        messages=[ChatMessage(role="user", content=PROMPT)], max_new_tokens=tokens
    )
    began, first, made = time.monotonic(), None, 0
    for message in client.call_stream(CHAT, request, timeout_s=300):
        if isinstance(message, ChatText) and first is None:
            first = time.monotonic()
        elif isinstance(message, ChatStats):
            made = message.tokens
    end = time.monotonic()
    assert first is not None
    return first - began, (made - 1) / (end - first)


def _via_api(client, model: str, tokens: int) -> tuple[float, float, int]:
    """TTFT, tokens/s after it and the tokens, through the OpenAI API (streamed)."""
    began, first, made = time.monotonic(), None, 0
    stream = client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=tokens,
        stream=True,
        stream_options={"include_usage": True},
    )
    for chunk in stream:
        if chunk.usage is not None:
            made = chunk.usage.completion_tokens
        if first is None and any(choice.delta.content for choice in chunk.choices):
            first = time.monotonic()
    end = time.monotonic()
    assert first is not None
    return first - began, (made - 1) / (end - first), made


def _via_http(port: int, token: str, model: str, tokens: int) -> float:
    """TTFT through the API with no client library (plain HTTP, SSE read by line): the
    daemon's part alone, without the `openai` client's own parsing."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": PROMPT}],
            "temperature": 0,
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    began, first = time.monotonic(), None
    try:
        connection.request("POST", "/v1/chat/completions", body=body, headers=headers)
        response = connection.getresponse()
        while line := response.readline():
            event = line.removeprefix(b"data: ").strip()
            if first is None and event.startswith(b"{"):
                delta = json.loads(event)["choices"][0]["delta"]
                first = time.monotonic() if delta.get("content") else None
    finally:
        connection.close()
    assert first is not None
    return first - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default=None, help="as for `volunteer start` (default: embedded)"
    )
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--streams", type=int, default=4)
    args = parser.parse_args()

    import openai

    with tempfile.TemporaryDirectory(prefix="api-bench-") as root:
        home = Path(root) / "home"
        port = _free_port()
        flags = ["--new-swarm", "--api", str(port), "--api-max-requests", str(args.streams)]
        flags += ["--model", args.model] if args.model else []
        _log(f"starting a daemon with the API on port {port}")
        started = _cli(home, "start", *flags)
        if started.returncode != 0:
            sys.exit(started.stderr)
        try:
            token = _cli(home, "api-token").stdout.strip()
            client = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key=token, max_retries=0
            )
            model = client.models.list().data[0].id
            _via_api(client, model, 8)  # warm: the chat's ends and tokenizer load
            chat_runs, api_runs, http_ttfts = [], [], []
            for round_index in range(args.rounds):
                chat_runs.append(_via_chat(home, args.tokens))
                ttft, rate, _ = _via_api(client, model, args.tokens)
                api_runs.append((ttft, rate))
                http_ttfts.append(_via_http(port, token, model, args.tokens))
                _log(f"round {round_index + 1}: chat {chat_runs[-1]}, api {api_runs[-1]}")
            chat_ttft = statistics.median(run[0] for run in chat_runs)
            chat_rate = statistics.median(run[1] for run in chat_runs)
            api_ttft = statistics.median(run[0] for run in api_runs)
            api_rate = statistics.median(run[1] for run in api_runs)
            http_ttft = statistics.median(http_ttfts)

            results: list[tuple[float, float, int]] = []

            def one() -> None:
                results.append(_via_api(client, model, args.tokens))

            threads = [threading.Thread(target=one) for _ in range(args.streams)]
            began = time.monotonic()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            together = sum(made for _, _, made in results) / (time.monotonic() - began)
        finally:
            _cli(home, "stop", "--now")
    figures = {
        "chat_ttft_s": round(chat_ttft, 3),
        "api_ttft_s": round(api_ttft, 3),
        "chat_tokens_s": round(chat_rate, 2),
        "api_tokens_s": round(api_rate, 2),
        "api_over_chat_tokens_s": round(api_rate / chat_rate, 3),
        "chat_over_api_ttft": round(chat_ttft / api_ttft, 3),
        "http_ttft_s": round(http_ttft, 3),
        "chat_over_http_ttft": round(chat_ttft / http_ttft, 3),
        "concurrent_streams": args.streams,
        "concurrent_total_tokens_s": round(together, 2),
        "concurrent_over_one": round(together / api_rate, 2),
    }
    print(json.dumps(figures))
    print(f"{'':>22} {'chat':>8} {'API':>8} {'speed':>9}")
    ttft_ratio = chat_ttft / api_ttft
    print(f"{'time to first token s':>22} {chat_ttft:>8.3f} {api_ttft:>8.3f} {ttft_ratio:>9.3f}")
    print(f"{'tokens/s':>22} {chat_rate:>8.2f} {api_rate:>8.2f} {api_rate / chat_rate:>9.3f}")
    print(
        f"time to first token over plain HTTP (no client library): {http_ttft:.3f} s, "
        f"speed {chat_ttft / http_ttft:.3f} of chat's"
    )
    print(
        f"{args.streams} concurrent API streams: {together:.2f} tokens/s in all "
        f"({together / api_rate:.2f}x one stream)"
    )


if __name__ == "__main__":
    main()
