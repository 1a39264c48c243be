"""The control API: a real ControlServer on a real Unix socket, driven by the sync client."""

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

import pytest

from volunteer.control.channel import (
    MAX_MESSAGE_BYTES,
    ControlClient,
    ControlError,
    ControlServer,
    ControlTimeoutError,
    DaemonNotRunningError,
    socket_path,
    use_tcp,
)
from volunteer.paths import Paths

pytestmark = pytest.mark.skipif(use_tcp(), reason="the Unix-socket path is tested here")


class LoopThread:
    """An event loop in a thread, as the daemon runs one; the test thread is the CLI."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Any, timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        self.run(_cancel_other_tasks())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)
        self.loop.close()


async def _cancel_other_tasks() -> None:
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def echo(params: dict[str, Any]) -> Any:
    return params


async def fail(params: dict[str, Any]) -> Any:
    raise RuntimeError("the method broke")


async def slow(params: dict[str, Any]) -> Any:
    await asyncio.sleep(30)


async def count(params: dict[str, Any]) -> AsyncIterator[Any]:
    for i in range(params["n"]):
        await asyncio.sleep(0)
        yield {"token": i}
    if params.get("fail"):
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
    control.register("echo", echo)
    control.register("fail", fail)
    control.register("slow", slow)
    control.register_stream("count", count)
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
    assert ControlClient(paths).call("echo", params) == params


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
        ControlClient(paths).call("nope")


def test_a_failing_method_is_reported_and_the_server_goes_on(
    server: ControlServer, paths: Paths
) -> None:
    client = ControlClient(paths)
    with pytest.raises(ControlError, match="fail: the method broke"):
        client.call("fail")
    assert client.call("echo", {"still": "here"}) == {"still": "here"}


def test_oversized_message_is_refused(server: ControlServer, paths: Paths) -> None:
    answers = raw_exchange(
        paths, b'{"method": "echo", "params": {"x": "' + b"a" * MAX_MESSAGE_BYTES
    )
    assert answers == [{"ok": False, "error": f"message longer than {MAX_MESSAGE_BYTES} bytes"}]
    client = ControlClient(paths)
    assert client.call("echo", {"after": True}) == {"after": True}
    # The client refuses to send one at all.
    with pytest.raises(ControlError, match="request longer than"):
        client.call("echo", {"x": "a" * MAX_MESSAGE_BYTES})


def test_streaming_call_yields_partial_results_then_ends(
    server: ControlServer, paths: Paths
) -> None:
    results = list(ControlClient(paths).call_stream("count", {"n": 5}))
    assert results == [{"token": i} for i in range(5)]


def test_a_stream_that_breaks_raises_after_its_partial_results(
    server: ControlServer, paths: Paths
) -> None:
    received = []
    with pytest.raises(ControlError, match="count: stream broke"):
        for result in ControlClient(paths).call_stream("count", {"n": 2, "fail": True}):
            received.append(result)
    assert received == [{"token": 0}, {"token": 1}]


def test_a_call_times_out(server: ControlServer, paths: Paths) -> None:
    client = ControlClient(paths)
    with pytest.raises(ControlTimeoutError):
        client.call("slow", timeout_s=0.3)
    assert client.call("echo", {"a": 1}) == {"a": 1}


def test_no_daemon_means_not_running(paths: Paths) -> None:
    with pytest.raises(DaemonNotRunningError):
        ControlClient(paths).call("echo")


def test_a_leftover_socket_file_is_not_a_daemon(paths: Paths) -> None:
    path = socket_path(paths)
    path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.bind(str(path))  # bound, never listening: what a killed daemon leaves
    with pytest.raises(DaemonNotRunningError):
        ControlClient(paths).call("echo")


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
            ControlClient(paths).call("status", timeout_s=5)
        thread.join(5)


def test_a_deep_home_gets_a_short_socket_path(tmp_path: Path) -> None:
    paths = make_paths(tmp_path / ("d" * 60) / ("e" * 60))
    assert not socket_path(paths).is_relative_to(paths.runtime_dir)
    loop = LoopThread()
    control = ControlServer(paths)
    control.register("echo", echo)
    loop.run(control.start())
    try:
        assert ControlClient(paths).call("echo", {"deep": 1}) == {"deep": 1}
    finally:
        loop.run(control.close())
        loop.close()
    assert not socket_path(paths).exists()
