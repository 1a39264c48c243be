"""The daemon's side of the control API: serves registered methods on the endpoint.

Each request's params are validated against the method's params model before its
handler sees them, and each result is dumped through the method's reply type (see
`volunteer.control.messages`). A bad message gets an error response; the daemon keeps
serving. A connection may carry several requests, one after another.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import pydantic

from volunteer.control.endpoint import (
    MAX_MESSAGE_BYTES,
    ControlError,
    encode,
    error_message,
    private_dir,
    socket_path,
    tcp_info_path,
    use_tcp,
)
from volunteer.control.messages import Method, P, Params, R, first_problem
from volunteer.errors import VolunteerError
from volunteer.machine.atomic import write_file_atomic
from volunteer.paths import Paths

logger = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 120.0
"""A connection that sends nothing for this long is closed."""
SEND_TIMEOUT_S = 30.0
"""A client that reads nothing for this long is dropped (its socket buffer stays full)."""
ACCEPT_SETTLE_S = 0.05
"""How long `ControlServer.close` lets connections accepted as it closes be made, so that
it closes them too (a few turns of the loop; a stop is not in a hurry)."""


@dataclasses.dataclass(frozen=True)
class _Registered:
    method: Method[Any, Any]
    handler: Callable[[Any], Any]


@dataclasses.dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, message: Mapping[str, Any]) -> None:
        self.writer.write(encode(message))
        await asyncio.wait_for(self.writer.drain(), timeout=SEND_TIMEOUT_S)


class ControlServer:
    """Serves registered methods on the control endpoint.

    Args:
        paths: the instance's folders (the endpoint lives in `paths.runtime_dir`).
    """

    def __init__(self, paths: Paths) -> None:
        self._paths = paths
        self._methods: dict[str, _Registered] = {}
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._token = ""
        self._removables: list[Path] = []

    def register(self, method: Method[P, R], handler: Callable[[P], Awaitable[R]]) -> None:
        """Adds `method`, answered by `await handler(params)`."""
        if method.is_stream:
            raise TypeError(f"{method.name} streams: register it with register_stream")
        self._methods[method.name] = _Registered(method, handler)

    def register_stream(
        self, method: Method[P, R], handler: Callable[[P], AsyncIterator[R]]
    ) -> None:
        """Adds a streaming `method`: `handler(params)` is an async generator of results."""
        if not (method.is_stream and inspect.isasyncgenfunction(handler)):
            raise TypeError(f"{method.name}: a streaming handler must be an async generator")
        self._methods[method.name] = _Registered(method, handler)

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
        private_dir(self._paths.runtime_dir)
        info = tcp_info_path(self._paths)
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
            await connection.send(error_message(f"message longer than {MAX_MESSAGE_BYTES} bytes"))
            return False
        if not line:
            return False
        try:
            registered, params = self._parse(line)
        except ControlError as exc:
            await connection.send(error_message(str(exc)))
            return True
        if registered.method.is_stream:
            await self._answer_stream(connection, registered, params)
        else:
            await self._answer(connection, registered, params)
        return True

    def _parse(self, line: bytes) -> tuple[_Registered, Params]:
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
        name = request["method"]
        registered = self._methods.get(name)
        if registered is None:
            raise ControlError(
                f"unknown method {name!r}; known: {', '.join(sorted(self._methods))}"
            )
        try:
            return registered, registered.method.params.model_validate(params)
        except pydantic.ValidationError as exc:
            raise ControlError(f"{name}: bad params: {first_problem(exc)}") from None

    async def _answer(
        self, connection: _Connection, registered: _Registered, params: Params
    ) -> None:
        method = registered.method
        try:
            result = method.dump_reply(await registered.handler(params))
            message = {"ok": True, "result": result}
        except Exception as exc:  # a failing method must not take the daemon down
            _log_failure("control method", method.name, exc)
            message = error_message(f"{method.name}: {exc}")
        await connection.send(message)

    async def _answer_stream(
        self, connection: _Connection, registered: _Registered, params: Params
    ) -> None:
        method = registered.method
        stream = registered.handler(params)
        try:
            async for result in stream:
                reply = method.dump_reply(result)
                await connection.send({"ok": True, "result": reply, "more": True})
        except (ConnectionError, asyncio.TimeoutError, asyncio.CancelledError):
            raise
        except Exception as exc:  # a failing method must not take the daemon down
            _log_failure("control stream", method.name, exc)
            await connection.send(error_message(f"{method.name}: {exc}"))
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
