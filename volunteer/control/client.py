"""The CLI's and the TUI's side of the control API: typed calls to the local daemon.

Each reply is validated against the method's reply type (`volunteer.control.messages`);
an answer that is not JSON or not that reply is a `MalformedReplyError` naming the method.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator, Mapping
from typing import Any

import pydantic

from volunteer.control.endpoint import (
    MAX_MESSAGE_BYTES,
    ControlError,
    ControlTimeoutError,
    DaemonNotRunningError,
    MalformedReplyError,
    encode,
    socket_path,
    tcp_info_path,
    use_tcp,
)
from volunteer.control.messages import Method, P, R, first_problem
from volunteer.paths import Paths


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
        self,
        method: Method[P, R],
        params: P | Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> R:
        """Calls `method` and returns its reply.

        Args:
            params: the method's params; a mapping is sent as it is (the daemon checks it).
            timeout_s: time allowed for the answer (default: the client's).

        Raises:
            DaemonNotRunningError: nothing listens on the endpoint.
            ControlTimeoutError: no answer within `timeout_s`.
            MalformedReplyError: the answer is not the method's reply.
            ControlError: the daemon answered with an error.
        """
        deadline = time.monotonic() + (timeout_s or self._timeout_s)
        with self._connect(deadline) as conn:
            self._send(conn, method, params)
            return _reply(method, _read_message(conn, method, deadline))

    def call_stream(
        self,
        method: Method[P, R],
        params: P | Mapping[str, Any] | None = None,
        *,
        timeout_s: float | None = None,
    ) -> Iterator[R]:
        """Calls a streaming `method`; yields each partial reply as it arrives.

        Args:
            timeout_s: the longest wait for each next message (not for the whole stream).

        Raises:
            The same errors as `call`, when they happen.
        """
        wait_s = timeout_s or self._timeout_s
        with self._connect(time.monotonic() + wait_s) as conn:
            self._send(conn, method, params)
            while True:
                message = _read_message(conn, method, time.monotonic() + wait_s)
                if message.get("ok") and message.get("done"):
                    return
                yield _reply(method, message)

    def _send(self, conn: _LineSocket, method: Method[Any, Any], params: Any | None) -> None:
        if isinstance(params, pydantic.BaseModel):
            sent = params.model_dump(mode="json", by_alias=True)
        else:
            sent = dict(params or {})
        request: dict[str, Any] = {"method": method.name, "params": sent}
        if conn.token:
            request["token"] = conn.token
        data = encode(request)
        if len(data) > MAX_MESSAGE_BYTES:
            raise ControlError(f"request longer than {MAX_MESSAGE_BYTES} bytes")
        conn.sendall(data)

    def _connect(self, deadline: float) -> _LineSocket:
        try:
            if use_tcp():
                info = json.loads(tcp_info_path(self._paths).read_text())
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
                raise MalformedReplyError("the daemon's answer is too long")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line


def _read_message(conn: _LineSocket, method: Method[Any, Any], deadline: float) -> dict[str, Any]:
    line = conn.readline(deadline)
    try:
        message = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MalformedReplyError(
            f"{method.name}: the daemon sent something that is not JSON ({exc})"
        ) from None
    if not isinstance(message, dict) or not isinstance(message.get("ok"), bool):
        raise MalformedReplyError(f'{method.name}: the daemon\'s answer has no "ok" flag')
    return message


def _reply(method: Method[Any, R], message: dict[str, Any]) -> R:
    if not message["ok"]:
        raise ControlError(str(message.get("error", "the daemon reported an unknown error")))
    try:
        return method.parse_reply(message.get("result"))
    except pydantic.ValidationError as exc:
        raise MalformedReplyError(
            f"{method.name}: the daemon's reply is malformed: {first_problem(exc)}"
        ) from None
