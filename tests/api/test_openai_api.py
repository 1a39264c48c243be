"""The OpenAI API of a real daemon serving SmolLM2, through the official `openai` client:
models, chat (whole and streamed as generated), completions, `stop`, `max_tokens`,
`seed`, usage; greedy output equal to `volunteer chat`'s; each error with its status and
OpenAI's shape; a client that goes away mid-stream frees its server-side session."""

from __future__ import annotations

import http.client
import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.daemon.homes import Homes, wait_for
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import use_tcp
from volunteer.control.messages import PAUSE, RESUME
from volunteer.paths import Paths

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(use_tcp(), reason="daemon tests use the Unix-socket path"),
]

PROMPT = "What is the capital of France?"
COUNT = "Count from 1 to 60, separated by commas."
COUNT_TO_TEN = "Count from 1 to 10, separated by commas."
QUEUE_TIMEOUT_S = 1


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Daemon:
    def __init__(self, homes: Homes, home: Path, port: int) -> None:
        self.homes, self.home, self.port = homes, home, port
        self.url = f"http://127.0.0.1:{port}/v1"
        token = homes.cli(home, "api-token")
        assert token.returncode == 0, token.stderr
        self.token = token.stdout.strip()
        self.client = openai.OpenAI(base_url=self.url, api_key=self.token, max_retries=0)
        self.model = self.client.models.list().data[0].id

    def status(self) -> dict[str, Any]:
        return self.homes.status(self.home)

    def raw(self, method: str, path: str, body: bytes | None, token: str | None = None):
        """An HTTP request as it is (no client library): its status, headers and JSON."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        try:
            connection.request(method, f"/v1{path}", body=body, headers=headers)
            response = connection.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            connection.close()


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory, smollm2_folder: Path) -> Iterator[Daemon]:
    homes = Homes(tmp_path_factory.mktemp("api"))
    home = homes.home("one")
    home.mkdir()
    port = _free_port()
    flags = ["--model", str(smollm2_folder), "--threads", "1", "--new-swarm"]
    flags += ["--api", str(port), "--api-max-requests", "1"]
    flags += ["--api-queue-timeout", str(QUEUE_TIMEOUT_S), "--leave-grace", "0"]
    flags += ["--repair-wait", "1"]
    try:
        started = homes.cli(home, "start", *flags)
        assert started.returncode == 0, started.stderr
        yield Daemon(homes, home, port)
    finally:
        homes.reap()


def test_the_model_is_listed_and_greedy_chat_equals_volunteer_chat(daemon: Daemon) -> None:
    assert [m.id for m in daemon.client.models.list().data] == [daemon.model]
    cli = daemon.homes.cli(daemon.home, "chat", "--max-new-tokens", "24", "--verify", "off", PROMPT)
    assert cli.returncode == 0, cli.stderr
    answer = daemon.client.chat.completions.create(
        model=daemon.model,
        messages=[{"role": "user", "content": PROMPT}],
        temperature=0,
        max_tokens=24,
    )
    assert answer.choices[0].message.content == cli.stdout.rstrip("\n")
    assert answer.choices[0].finish_reason in ("stop", "length")
    usage = answer.usage
    assert usage is not None and usage.prompt_tokens > 5 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert daemon.status()["api_requests"] >= 1


def test_a_streamed_chat_arrives_as_it_is_generated(daemon: Daemon) -> None:
    began = time.monotonic()
    arrivals: list[float] = []
    pieces: list[str] = []
    usage = None
    stream = daemon.client.chat.completions.create(
        model=daemon.model,
        messages=[{"role": "user", "content": COUNT}],
        temperature=0,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    finish = None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                arrivals.append(time.monotonic())
                pieces.append(choice.delta.content)
            finish = choice.finish_reason or finish
    assert len(pieces) >= 20 and finish == "length"
    assert usage is not None and usage.completion_tokens == 40
    # Spread over the generation, not all at its end.
    assert arrivals[-1] - arrivals[0] > 0.5 * (arrivals[-1] - began)
    whole = daemon.client.chat.completions.create(
        model=daemon.model, messages=[{"role": "user", "content": COUNT}], temperature=0,
        max_tokens=40,
    )  # fmt: skip
    assert "".join(pieces) == whole.choices[0].message.content


def test_completions_stop_and_max_tokens(daemon: Daemon) -> None:
    plain = daemon.client.completions.create(
        model=daemon.model, prompt="The capital of France is", temperature=0, max_tokens=6
    )
    assert plain.choices[0].finish_reason == "length"
    assert plain.usage is not None and plain.usage.completion_tokens == 6
    assert plain.choices[0].text.strip()
    stopped = daemon.client.chat.completions.create(
        model=daemon.model, messages=[{"role": "user", "content": COUNT_TO_TEN}],
        temperature=0, max_tokens=60, stop=["never said", ", 5"],
    )  # fmt: skip
    text = stopped.choices[0].message.content or ""
    assert stopped.choices[0].finish_reason == "stop", text
    assert text == "1, 2, 3, 4", text
    assert stopped.usage is not None and stopped.usage.completion_tokens < 60


def test_a_seed_reproduces_a_sampled_answer(daemon: Daemon) -> None:
    def sample(seed: int) -> str:
        answer = daemon.client.completions.create(
            model=daemon.model, prompt="Once upon a time", temperature=1.0, seed=seed,
            max_tokens=12,
        )  # fmt: skip
        return answer.choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9))


def test_errors_have_their_status_and_openais_shape(daemon: Daemon) -> None:
    status, _, body = daemon.raw("POST", "/chat/completions", b"{not json", daemon.token)
    assert status == 400 and body["error"]["code"] == "invalid_json"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    with pytest.raises(openai.NotFoundError) as unknown:
        daemon.client.chat.completions.create(
            model="gpt-4", messages=[{"role": "user", "content": "hi"}]
        )
    assert unknown.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as too_long:
        daemon.client.completions.create(model=daemon.model, prompt="word " * 9000, max_tokens=4)
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as out_of_range:
        daemon.client.chat.completions.create(
            model=daemon.model, messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    assert out_of_range.value.body["param"] == "temperature"  # type: ignore[index]
    wrong = openai.OpenAI(base_url=daemon.url, api_key="vol-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    status, _, body = daemon.raw("GET", "/models", None)
    assert status == 401 and body["error"]["code"] == "invalid_api_key"


def test_a_full_daemon_answers_429_with_retry_after(daemon: Daemon) -> None:
    holding = daemon.client.chat.completions.create(
        model=daemon.model, messages=[{"role": "user", "content": COUNT}], temperature=0,
        max_tokens=300, stream=True,
    )  # fmt: skip
    try:
        next(iter(holding))  # its head is out: it holds the only slot
        assert daemon.status()["api_active"] == 1
        body = json.dumps(
            {"model": daemon.model, "messages": [{"role": "user", "content": "hi"}]}
        ).encode()
        status, headers, answer = daemon.raw("POST", "/chat/completions", body, daemon.token)
    finally:
        holding.close()
    assert status == 429 and answer["error"]["type"] == "rate_limit_error"
    assert headers["Retry-After"] == str(QUEUE_TIMEOUT_S)
    wait_for("the slot free again", lambda: daemon.status()["api_active"] == 0)


def _endless(daemon: Daemon, *, stream: bool) -> bytes:
    """A completion that would go on for minutes: counting, up to 2000 tokens."""
    prompt = ", ".join(str(i) for i in range(1, 30)) + ","
    asked = {"model": daemon.model, "prompt": prompt, "temperature": 0, "max_tokens": 2000}
    return json.dumps({**asked, "stream": stream}).encode()


def test_a_client_gone_mid_stream_frees_its_session(daemon: Daemon) -> None:
    body = _endless(daemon, stream=True)
    connection = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    headers = {"Authorization": f"Bearer {daemon.token}", "Content-Type": "application/json"}
    connection.request("POST", "/v1/completions", body=body, headers=headers)
    response = connection.getresponse()
    assert response.status == 200
    for _ in range(4):
        response.readline()  # a few events in: the session is open and generating
    assert daemon.status()["open_sessions"] == 1
    gone = time.monotonic()
    connection.sock.close()  # type: ignore[union-attr]
    connection.close()
    wait_for(
        "the session freed and the reply ended",
        lambda: daemon.status()["open_sessions"] == 0 and daemon.status()["chats_active"] == 0,
        timeout_s=10,
    )
    assert time.monotonic() - gone < 10


def test_no_route_is_a_503(daemon: Daemon) -> None:
    control = ControlClient(Paths.resolve(home=daemon.home, env=daemon.homes.env))
    assert control.call(PAUSE, timeout_s=30).paused
    wait_for("the server out of the swarm", lambda: daemon.status()["state"] == "paused")
    try:
        with pytest.raises(openai.InternalServerError) as failed:
            daemon.client.chat.completions.create(
                model=daemon.model, messages=[{"role": "user", "content": "hi"}], max_tokens=4
            )
        assert failed.value.status_code == 503 and failed.value.code == "no_route"
    finally:
        assert control.call(RESUME, timeout_s=30).paused is False


def test_a_client_gone_before_a_whole_answer_frees_its_session(daemon: Daemon) -> None:
    body = _endless(daemon, stream=False)
    head = (
        "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {daemon.token}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as sock:
        sock.sendall(head + body)
        wait_for("the answer under way", lambda: daemon.status()["open_sessions"] == 1)
    gone = time.monotonic()  # hung up before any byte of the answer
    wait_for(
        "the session freed and the reply ended",
        lambda: daemon.status()["open_sessions"] == 0 and daemon.status()["chats_active"] == 0,
        timeout_s=10,
    )
    assert time.monotonic() - gone < 10
