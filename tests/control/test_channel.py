"""The control API: a real ControlServer on a real Unix socket, driven by the sync client,
with methods of this test's own (the daemon's are tested with real daemons)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pydantic
import pytest

from volunteer.client.loop_thread import LoopThread
from volunteer.control.client import ControlClient
from volunteer.control.endpoint import (
    MAX_MESSAGE_BYTES,
    ControlError,
    ControlTimeoutError,
    DaemonNotRunningError,
    socket_path,
    use_tcp,
)
from volunteer.control.messages import STATUS, Method, NoParams, Params, Reply
from volunteer.control.server import ControlServer
from volunteer.paths import Paths

pytestmark = pytest.mark.skipif(use_tcp(), reason="the Unix-socket path is tested here")


class Anything(Params):
    model_config = pydantic.ConfigDict(extra="allow")


class CountParams(Params):
    n: int = pydantic.Field(ge=0)
    fail: bool = False


class Token(Reply):
    token: int


ECHO = Method("echo", Anything, dict[str, Any])
FAIL = Method("fail", NoParams, dict[str, Any])
SLOW = Method("slow", NoParams, dict[str, Any])
COUNT = Method("count", CountParams, Token, is_stream=True)
NOPE = Method("nope", NoParams, dict[str, Any])


async def echo(params: Anything) -> dict[str, Any]:
    return params.model_dump()


async def fail(params: NoParams) -> dict[str, Any]:
    raise RuntimeError("the method broke")


async def slow(params: NoParams) -> dict[str, Any]:
    await asyncio.sleep(30)
    return {}


async def count(params: CountParams) -> AsyncIterator[Token]:
    for i in range(params.n):
        await asyncio.sleep(0)
        yield Token(token=i)
    if params.fail:
        raise RuntimeError("stream broke")


def make_paths(root: Path) -> Paths:
    return Paths.resolve(home=root, env={"VOLUNTEER_CACHE_DIR": str(root / "cache")})


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return make_paths(tmp_path / "home")


@pytest.fixture
def server(paths: Paths) -> Iterator[ControlServer]:
    loop = LoopThread()
    control = ControlServer(paths)
    control.register(ECHO, echo)
    control.register(FAIL, fail)
    control.register(SLOW, slow)
    control.register_stream(COUNT, count)
    loop.run(control.start())
    try:
        yield control
    finally:
        loop.run(control.close())
        loop.close()


def raw_exchange(paths: Paths, data: bytes) -> list[dict[str, Any]]:
    """Sends bytes as they are; returns every answer line until the server hangs up."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(socket_path(paths)))
        # An oversized message: the server answers and hangs up while we still send.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)
        sock.shutdown(socket.SHUT_WR)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
    return [json.loads(line) for line in received.splitlines()]


def test_round_trip(server: ControlServer, paths: Paths) -> None:
    params = {"text": "héllo", "numbers": [1, 2.5], "nested": {"ok": None}}
    assert ControlClient(paths).call(ECHO, params) == params


def test_socket_is_private(server: ControlServer, paths: Paths) -> None:
    path = socket_path(paths)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_bad_json_gets_an_error_and_the_connection_keeps_serving(
    server: ControlServer, paths: Paths
) -> None:
    answers = raw_exchange(
        paths,
        b"{not json\n"
        b'["a list"]\n'
        b'{"method": "echo", "params": [1]}\n'
        b'{"method": "echo", "params": {"x": 1}}\n',
    )
    assert [a["ok"] for a in answers] == [False, False, False, True]
    assert "not JSON" in answers[0]["error"]
    assert 'string "method"' in answers[1]["error"]
    assert '"params" must be an object' in answers[2]["error"]
    assert answers[3]["result"] == {"x": 1}


def test_unknown_method_lists_the_known_ones(server: ControlServer, paths: Paths) -> None:
    with pytest.raises(ControlError, match="unknown method 'nope'; known: count, echo, fail"):
        ControlClient(paths).call(NOPE)


def test_a_failing_method_is_reported_and_the_server_goes_on(
    server: ControlServer, paths: Paths
) -> None:
    client = ControlClient(paths)
    with pytest.raises(ControlError, match="fail: the method broke"):
        client.call(FAIL)
    assert client.call(ECHO, {"still": "here"}) == {"still": "here"}


def test_oversized_message_is_refused(server: ControlServer, paths: Paths) -> None:
    answers = raw_exchange(
        paths, b'{"method": "echo", "params": {"x": "' + b"a" * MAX_MESSAGE_BYTES
    )
    assert answers == [{"ok": False, "error": f"message longer than {MAX_MESSAGE_BYTES} bytes"}]
    client = ControlClient(paths)
    assert client.call(ECHO, {"after": True}) == {"after": True}
    # The client refuses to send one at all.
    with pytest.raises(ControlError, match="request longer than"):
        client.call(ECHO, {"x": "a" * MAX_MESSAGE_BYTES})


def test_streaming_call_yields_partial_results_then_ends(
    server: ControlServer, paths: Paths
) -> None:
    results = list(ControlClient(paths).call_stream(COUNT, {"n": 5}))
    assert results == [Token(token=i) for i in range(5)]


def test_a_stream_that_breaks_raises_after_its_partial_results(
    server: ControlServer, paths: Paths
) -> None:
    received = []
    with pytest.raises(ControlError, match="count: stream broke"):
        for result in ControlClient(paths).call_stream(COUNT, {"n": 2, "fail": True}):
            received.append(result)
    assert received == [Token(token=0), Token(token=1)]


def test_params_are_checked_against_the_method_before_it_runs(
    server: ControlServer, paths: Paths
) -> None:
    client = ControlClient(paths)
    with pytest.raises(ControlError, match="count: bad params: n: Input should be greater"):
        list(client.call_stream(COUNT, {"n": -1}))
    with pytest.raises(ControlError, match="count: bad params: n: Field required"):
        list(client.call_stream(COUNT, {}))
    assert list(client.call_stream(COUNT, CountParams(n=1))) == [Token(token=0)]


def test_registering_a_method_the_wrong_way_is_refused(paths: Paths) -> None:
    control = ControlServer(paths)
    with pytest.raises(TypeError, match="streams"):
        control.register(COUNT, count)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="async generator"):
        control.register_stream(ECHO, echo)  # type: ignore[arg-type]


def test_a_call_times_out(server: ControlServer, paths: Paths) -> None:
    client = ControlClient(paths)
    with pytest.raises(ControlTimeoutError):
        client.call(SLOW, timeout_s=0.3)
    assert client.call(ECHO, {"a": 1}) == {"a": 1}


def test_no_daemon_means_not_running(paths: Paths) -> None:
    with pytest.raises(DaemonNotRunningError):
        ControlClient(paths).call(ECHO)


def test_a_leftover_socket_file_is_not_a_daemon(paths: Paths) -> None:
    path = socket_path(paths)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: what a killed daemon leaves
    with pytest.raises(DaemonNotRunningError):
        ControlClient(paths).call(ECHO)


def test_a_daemon_that_exits_mid_call_is_a_control_error(paths: Paths) -> None:
    # What a failing start looks like from the CLI: the daemon accepted the connection,
    # then exited with our request unread, so the kernel resets the socket.
    path = socket_path(paths)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(1)

        def accept_then_exit() -> None:
            conn, _ = listener.accept()
            with conn:
                conn.settimeout(5)
                # Wait until the request has arrived, leave it unread, and hang up.
                conn.recv(1, socket.MSG_PEEK)

        thread = threading.Thread(target=accept_then_exit)
        thread.start()
        with pytest.raises(ControlError, match="closed the connection"):
            ControlClient(paths).call(STATUS, timeout_s=5)
        thread.join(5)


def test_a_deep_home_gets_a_short_socket_path(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / ("d" * 60) / ("e" * 60))
    assert not socket_path(paths).is_relative_to(paths.runtime_dir)
    loop = LoopThread()
    control = ControlServer(paths)
    control.register(ECHO, echo)
    loop.run(control.start())
    try:
        assert ControlClient(paths).call(ECHO, {"deep": 1}) == {"deep": 1}
    finally:
        loop.run(control.close())
        loop.close()
    assert not socket_path(paths).exists()
