"""The daemon's local control API: the only way the CLI and the TUI talk to the daemon.

Newline-delimited JSON over a Unix socket (`control.sock` in the runtime dir, mode 0600,
created inside a 0700 folder so nobody else can reach it even before the chmod). Where
there are no Unix sockets (Windows) it listens on loopback TCP instead and every request
must carry the token from `control.json`, a 0600 file in the runtime dir.

One line per message::

    request   {"method": "status", "params": {}}              (+ "token" over TCP)
    response  {"ok": true, "result": ...}  or  {"ok": false, "error": "..."}
    stream    {"ok": true, "result": ..., "more": true} ...  then  {"ok": true, "done": true}

A bad message gets an error response; the daemon keeps serving. A connection may carry
several requests, one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import os
import secrets
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from volunteer.errors import VolunteerError
from volunteer.machine.atomic import write_file_atomic
from volunteer.paths import Paths

logger = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 1 << 20
"""Longest accepted line, either way; a longer request is refused."""
_SOCKET_NAME = "control.sock"
_TCP_INFO_NAME = "control.json"
_MAX_UNIX_PATH_BYTES = 100  # sun_path holds 104 (macOS) to 108 (Linux) bytes
IDLE_TIMEOUT_S = 120.0
"""A connection that sends nothing for this long is closed."""
SEND_TIMEOUT_S = 30.0
"""A client that reads nothing for this long is dropped (its socket buffer stays full)."""

Handler = Callable[[dict[str, Any]], Awaitable[Any]]
StreamHandler = Callable[[dict[str, Any]], AsyncIterator[Any]]


class ControlError(VolunteerError):
    """The daemon answered a control request with an error."""


class DaemonNotRunningError(ControlError):
    """Nothing listens on the control endpoint."""


class ControlTimeoutError(ControlError):
    """The daemon did not answer in time."""


def use_tcp() -> bool:
    """Whether this system needs the loopback TCP fallback (no Unix sockets)."""
    return os.name == "nt" or not hasattr(socket, "AF_UNIX")


def socket_path(paths: Paths) -> Path:
    """Where the control socket lives for this instance.

    A deep `--home` can exceed the socket path limit; then the socket moves to a short,
    private folder in the temp dir, named after a hash of the runtime dir so each home
    keeps its own.
    """
    path = paths.runtime_dir / _SOCKET_NAME
    if len(os.fsencode(path)) <= _MAX_UNIX_PATH_BYTES:
        return path
    digest = hashlib.sha256(os.fsencode(paths.runtime_dir)).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"volunteer-{os.getuid()}-{digest}" / _SOCKET_NAME


def private_dir(path: Path) -> Path:
    """Creates `path` (and parents) and makes it 0700; returns it."""
    path.mkdir(parents=True, exist_ok=True)
    if os.name == "posix":
        if path.stat().st_uid != os.getuid():
            raise ControlError(f"{path} belongs to another user; refusing to use it")
        path.chmod(0o700)
    return path


@dataclasses.dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, message: Mapping[str, Any]) -> None:
        self.writer.write(_encode(message))
        await asyncio.wait_for(self.writer.drain(), timeout=SEND_TIMEOUT_S)


ACCEPT_SETTLE_S = 0.05
"""How long `ControlServer.close` lets connections accepted as it closes be made, so that
it closes them too (a few turns of the loop; a stop is not in a hurry)."""


class ControlServer:
    """Serves registered methods on the control endpoint.

    Args:
        paths: the instance's folders (the endpoint lives in `paths.runtime_dir`).
    """

    def __init__(self, paths: Paths) -> None:
        self._paths = paths
        self._handlers: dict[str, Handler] = {}
        self._stream_handlers: dict[str, StreamHandler] = {}
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._token = ""
        self._removables: list[Path] = []

    def register(self, name: str, handler: Handler) -> None:
        """Adds `name`, answered by `await handler(params)` (a JSON-able result)."""
        self._handlers[name] = handler

    def register_stream(self, name: str, handler: StreamHandler) -> None:
        """Adds a streaming `name`: `handler(params)` is an async generator of results."""
        if not inspect.isasyncgenfunction(handler):
            raise TypeError(f"{name}: a streaming handler must be an async generator function")
        self._stream_handlers[name] = handler

    async def start(self) -> None:
        """Starts listening (a Unix socket, or loopback TCP where there is none)."""
        if use_tcp():
            await self._start_tcp()
        else:
            await self._start_unix()

    async def close(self) -> None:
        """Stops listening, closes open connections, removes the endpoint files."""
        # A connection the loop accepted a moment ago gets its transport on the next turn;
        # on Python 3.11 one made after `Server.close()` fails and leaks its socket. So
        # let those turns pass first, then give the made ones time to reach `_accept`.
        for _ in range(2):
            await asyncio.sleep(0)
        if self._server is not None:
            self._server.close()
        await asyncio.sleep(ACCEPT_SETTLE_S)
        writers = list(self._writers)
        for writer in writers:
            writer.close()
        for writer in writers:
            # The socket closes on a later turn of the loop: wait for it, or a loop closed
            # right after us leaves it open.
            with contextlib.suppress(OSError, asyncio.TimeoutError):
                await asyncio.wait_for(writer.wait_closed(), timeout=1.0)
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5.0)
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), timeout=5.0)
        for path in self._removables:
            path.unlink(missing_ok=True)

    async def _start_unix(self) -> None:
        path = socket_path(self._paths)
        private_dir(path.parent)
        # Only reached once the caller knows no live daemon owns it: a leftover socket.
        path.unlink(missing_ok=True)
        self._server = await asyncio.start_unix_server(
            self._accept, path=str(path), limit=MAX_MESSAGE_BYTES
        )
        path.chmod(0o600)
        self._removables.append(path)

    async def _start_tcp(self) -> None:
        self._token = secrets.token_hex(32)
        self._server = await asyncio.start_server(
            self._accept, host="127.0.0.1", port=0, limit=MAX_MESSAGE_BYTES
        )
        port = self._server.sockets[0].getsockname()[1]
        info = private_dir(self._paths.runtime_dir) / _TCP_INFO_NAME
        write_file_atomic(info, json.dumps({"port": port, "token": self._token}).encode())
        with contextlib.suppress(OSError):
            info.chmod(0o600)
        self._removables.append(info)

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain function, so the connection is ours the moment it is made: `close` then
        # closes it even if its task is cancelled before it ever ran.
        self._writers.add(writer)
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connection = _Connection(reader, writer)
        try:
            while await self._serve_one(connection):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.TimeoutError):
            pass  # the client went away or stalled; nothing more to answer
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _serve_one(self, connection: _Connection) -> bool:
        try:
            line = await asyncio.wait_for(connection.reader.readline(), timeout=IDLE_TIMEOUT_S)
        except ValueError:
            # The rest of an oversized line cannot be resynchronised: answer and hang up.
            await connection.send(_error(f"message longer than {MAX_MESSAGE_BYTES} bytes"))
            return False
        if not line:
            return False
        try:
            method, params = self._parse(line)
        except ControlError as exc:
            await connection.send(_error(str(exc)))
            return True
        if method in self._stream_handlers:
            await self._answer_stream(connection, method, params)
        else:
            await self._answer(connection, method, params)
        return True

    def _parse(self, line: bytes) -> tuple[str, dict[str, Any]]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ControlError(f"not JSON: {exc}") from None
        if not isinstance(request, dict) or not isinstance(request.get("method"), str):
            raise ControlError('a request is an object with a string "method"')
        if self._token and not secrets.compare_digest(str(request.get("token", "")), self._token):
            raise ControlError("bad or missing token")
        params = request.get("params") or {}
        if not isinstance(params, dict):
            raise ControlError('"params" must be an object')
        method = request["method"]
        if method not in self._handlers and method not in self._stream_handlers:
            known = ", ".join(sorted([*self._handlers, *self._stream_handlers]))
            raise ControlError(f"unknown method {method!r}; known: {known}")
        return method, params

    async def _answer(self, connection: _Connection, method: str, params: dict[str, Any]) -> None:
        try:
            result = await self._handlers[method](params)
            message = {"ok": True, "result": result}
        except Exception as exc:  # a failing method must not take the daemon down
            _log_failure("control method", method, exc)
            message = _error(f"{method}: {exc}")
        await connection.send(message)

    async def _answer_stream(
        self, connection: _Connection, method: str, params: dict[str, Any]
    ) -> None:
        stream = self._stream_handlers[method](params)
        try:
            async for result in stream:
                await connection.send({"ok": True, "result": result, "more": True})
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a failing method must not take the daemon down
            _log_failure("control stream", method, exc)
            await connection.send(_error(f"{method}: {exc}"))
            return
        finally:
            await stream.aclose()
        await connection.send({"ok": True, "done": True})


def _log_failure(kind: str, method: str, exc: Exception) -> None:
    # Our own errors are expected outcomes (bad input, no servers left): one line is
    # enough. Anything else is a bug and keeps its traceback.
    if isinstance(exc, VolunteerError):
        logger.warning("%s %s failed: %s", kind, method, exc)
    else:
        logger.exception("%s %s failed", kind, method)


class ControlClient:
    """Talks to the local daemon; synchronous, for the CLI and the TUI's worker threads.

    Args:
        paths: the instance's folders.
        timeout_s: default time allowed for a call.
    """

    def __init__(self, paths: Paths, *, timeout_s: float = 10.0) -> None:
        self._paths = paths
        self._timeout_s = timeout_s

    def call(
        self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Any:
        """Calls `method` and returns its result.

        Raises:
            DaemonNotRunningError: nothing listens on the endpoint.
            ControlTimeoutError: no answer within `timeout_s`.
            ControlError: the daemon answered with an error.
        """
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        with self._connect(deadline) as conn:
            self._send(conn, method, params)
            return _result(_read_message(conn, deadline))

    def call_stream(
        self, method: str, params: Mapping[str, Any] | None = None, timeout_s: float | None = None
    ) -> Iterator[Any]:
        """Calls a streaming `method`; yields each partial result as it arrives.

        Args:
            timeout_s: the longest wait for each next message (not for the whole stream).

        Raises:
            The same errors as `call`, when they happen.
        """
        wait_s = timeout_s or self._timeout_s
        with self._connect(time.monotonic() + wait_s) as conn:
            self._send(conn, method, params)
            while True:
                message = _read_message(conn, time.monotonic() + wait_s)
                if message.get("ok") and message.get("done"):
                    return
                yield _result(message)

    def _send(self, conn: _LineSocket, method: str, params: Mapping[str, Any] | None) -> None:
        request: dict[str, Any] = {"method": method, "params": dict(params or {})}
        if conn.token:
            request["token"] = conn.token
        data = _encode(request)
        if len(data) > MAX_MESSAGE_BYTES:
            raise ControlError(f"request longer than {MAX_MESSAGE_BYTES} bytes")
        conn.sendall(data)

    def _connect(self, deadline: float) -> _LineSocket:
        try:
            if use_tcp():
                info = json.loads((self._paths.runtime_dir / _TCP_INFO_NAME).read_text())
                sock = socket.create_connection(("127.0.0.1", int(info["port"])), timeout=1.0)
                return _LineSocket(sock, token=str(info["token"]))
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                sock.connect(str(socket_path(self._paths)))
            except BaseException:
                sock.close()
                raise
            return _LineSocket(sock, token="")
        except (FileNotFoundError, ConnectionRefusedError) as exc:
            raise DaemonNotRunningError("the daemon is not running") from exc
        except TimeoutError as exc:
            raise ControlTimeoutError("the daemon did not accept the connection") from exc


class _LineSocket:
    """A connected socket read one line at a time."""

    def __init__(self, sock: socket.socket, *, token: str) -> None:
        self.sock, self.token, self._buffer = sock, token, b""

    def __enter__(self) -> _LineSocket:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.sock.close()

    def sendall(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except TimeoutError as exc:
            raise ControlTimeoutError("the daemon did not take the request in time") from exc
        except ConnectionError as exc:
            raise ControlError(f"the daemon closed the connection: {exc}") from exc

    def readline(self, deadline: float) -> bytes:
        while b"\n" not in self._buffer:
            remaining_s = deadline - time.monotonic()
            if remaining_s <= 0:
                raise ControlTimeoutError("the daemon did not answer in time")
            self.sock.settimeout(remaining_s)
            try:
                chunk = self.sock.recv(65536)
            except TimeoutError as exc:
                raise ControlTimeoutError("the daemon did not answer in time") from exc
            except ConnectionError as exc:
                # A daemon that exits mid-call (a failed start, a crash) resets the socket.
                raise ControlError(f"the daemon closed the connection: {exc}") from exc
            if not chunk:
                raise ControlError("the daemon closed the connection without an answer")
            self._buffer += chunk
            if len(self._buffer) > MAX_MESSAGE_BYTES and b"\n" not in self._buffer:
                raise ControlError("the daemon's answer is too long")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _read_message(conn: _LineSocket, deadline: float) -> dict[str, Any]:
    line = conn.readline(deadline)
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ControlError(f"the daemon sent something that is not JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ControlError("the daemon sent a malformed answer")
    return message


def _result(message: dict[str, Any]) -> Any:
    if not message.get("ok"):
        raise ControlError(str(message.get("error", "the daemon reported an unknown error")))
    return message.get("result")


def _encode(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":")).encode() + b"\n"


def _error(text: str) -> dict[str, Any]:
    return {"ok": False, "error": text}
