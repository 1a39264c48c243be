"""Calls to one server's span of blocks: info, forward, backward and inference streams.

Every call has a timeout. Failures come out as `volunteer.transport.protocol` errors: a
`RemoteError` (`BusyError`, `BadRequestError`, `SessionExpiredError`) when the server
answered with one, a `PeerUnavailableError` when it could not be reached, did not
answer in time, speaks another protocol version (`IncompatiblePeerError`), or answered
with anything but a valid reply (`BadReplyError`, see `volunteer.client.replies`).
Retrying, and choosing another server, is the caller's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import secrets
import time
import uuid
from typing import TypeVar

import torch
from google.protobuf.message import DecodeError, Message
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.client.calls import CONNECTION_ERRORS, within
from volunteer.client.keepalive import Keepalive, get_alive
from volunteer.client.replies import (
    OPEN_REPLY_BYTES,
    check_output,
    only_tensor,
    open_log,
    reply_bytes,
    server_error,
    step_limit,
    take_step_reply,
)
from volunteer.client.span_calls import Grads, SpanCalls
from volunteer.models.adapters import SpanAdapter
from volunteer.transport.local_link import open_preferring_local
from volunteer.transport.p2p_streams import open_stream
from volunteer.transport.protocol import (
    INFERENCE_HANDLE,
    INFO_HANDLE,
    BadReplyError,
    PeerUnavailableError,
    RemoteSpanError,
)
from volunteer.transport.queue_wait import get_within
from volunteer.trust.step_log import StepLog

INBOX_SIZE = 4
"""Frames read ahead of the caller: one reply per step, and an error, come at a time."""

PUSH_SECRET_BYTES = 16
"""128 random bits: no one can guess a session's push secret."""
KEEPALIVE = Keepalive()
"""How an inference stream tells a gone server from a slow one (see `Keepalive`)."""


class RemoteSpan:
    """Blocks [start, end) served by one peer."""

    def __init__(
        self, *, p2p: P2P, peer_id: PeerID, start: int, end: int, local_socket: str | None = None
    ) -> None:
        """
        Args:
            local_socket: the server's Unix socket on this machine (checked by
                `volunteer.transport.local_link.dialable`): inference streams open there first.
        """
        self.p2p = p2p
        self.peer_id = peer_id
        self.start = start
        self.end = end
        self.local_socket = local_socket

    def __repr__(self) -> str:
        return f"RemoteSpan({self.peer_id}, [{self.start}, {self.end}))"

    async def info(self, timeout_s: float = 10.0) -> wire.InfoReply:
        """The server's span, model, dtype, limits and free cache.

        Raises:
            IncompatiblePeerError: the server speaks another protocol version (a
                `PeerUnavailableError`: routing avoids it as it avoids a dead server).
            PeerUnavailableError, RemoteError: as for the other calls.
        """
        call = self.p2p.call_protobuf_handler(
            self.peer_id, INFO_HANDLE, runtime_pb2.ExpertUID(), runtime_pb2.ExpertResponse
        )
        reply = await within(call, timeout_s=timeout_s, what=repr(self))
        wire.check_version(reply.metadata, peer=repr(self))
        return wire.unpack_metadata(reply.metadata, wire.InfoReply)

    async def forward(
        self,
        hidden: torch.Tensor,
        timeout_s: float = 60.0,
        *,
        adapter: SpanAdapter | None = None,
    ) -> torch.Tensor:
        """Hidden states [B, S, H] through the span (no cache), with a fine-tuning
        client's adapter for this call if given; same dtype back."""
        return await self._calls().forward(hidden, timeout_s=timeout_s, adapter=adapter)

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        timeout_s: float = 60.0,
        *,
        adapter: SpanAdapter | None = None,
    ) -> Grads:
        """The gradients of the span's inputs (and of the adapter's tensors, if given),
        given its inputs and its outputs' gradient."""
        calls = self._calls()
        return await calls.backward(hidden, grad_outputs, timeout_s=timeout_s, adapter=adapter)

    def _calls(self) -> SpanCalls:
        return SpanCalls(self.p2p, self.peer_id, self.start, self.end, repr(self))

    async def open_inference(
        self,
        *,
        max_length: int,
        batch_size: int,
        timeout_s: float = 30.0,
        session_id: str | None = None,
        next_step_id: int = 1,
        keepalive: Keepalive | None = KEEPALIVE,
    ) -> InferenceStream:
        """Opens an inference session holding a KV cache on the server.

        The session takes pushes only with a secret drawn here (see `push_target`), and
        only for its next step, numbered from `next_step_id` on. While a reply is late,
        the server is pinged as `keepalive` says (None: never; see
        `volunteer.client.keepalive`).

        Raises:
            BusyError: the server has no cache room for batch_size * max_length now.
            BadRequestError: a limit is exceeded (batch, context length, span).
            PeerUnavailableError: the server could not be reached in time.
        """
        opening = wire.OpenSessionRequest(
            start=self.start,
            end=self.end,
            session_id=session_id or uuid.uuid4().hex,
            max_length=max_length,
            batch_size=batch_size,
            push_secret=secrets.token_hex(PUSH_SECRET_BYTES),
            next_step_id=next_step_id,
        )
        stream = InferenceStream(
            span=self,
            session_id=opening.session_id,
            push_secret=opening.push_secret,
            keepalive=keepalive,
        )
        await stream.open(opening, timeout_s=timeout_s)
        return stream


async def ping(p2p: P2P, peer_id: PeerID, timeout_s: float) -> float:
    """Seconds for one `info` round trip to `peer_id`.

    Raises:
        PeerUnavailableError, RemoteError: as for `RemoteSpan.info`.
    """
    began = time.perf_counter()
    await RemoteSpan(p2p=p2p, peer_id=peer_id, start=0, end=1).info(timeout_s=timeout_s)
    return time.perf_counter() - began


class InferenceStream:
    """One inference session on one server: steps go in order, one at a time.

    It drives the connection itself: hivemind's stream helper reports a dead server
    only at the caller's next request, so a client waiting for a reply would sit out
    its whole timeout instead of failing over. Here a reader task takes every frame (and
    the end of the stream) as it arrives: a dead server is seen at once, and a reason
    it sent before closing (an expired session) is kept even when the next write fails;
    a vanished host is found by pinging it while a reply is late (`client.keepalive`).
    """

    def __init__(
        self,
        *,
        span: RemoteSpan,
        session_id: str,
        push_secret: str | None = None,
        keepalive: Keepalive | None = None,
    ) -> None:
        self.span = span
        self.session_id = session_id
        self._push_secret = push_secret
        self._keepalive = keepalive
        self._writer: asyncio.StreamWriter | None = None
        # Bounded: a server that sends more than it was asked is not read further.
        self._inbox: asyncio.Queue[tuple[bytes, bytes] | BaseException] = asyncio.Queue(INBOX_SIZE)
        self._reply_limit = OPEN_REPLY_BYTES
        """The largest reply to the last request: the open's acknowledgement, then a
        step's output (see `replies.reply_bytes` and `_frame_limit`)."""
        self._is_awaited = asyncio.Event()
        """Set while the caller waits for a reply."""
        self.max_chunk: int | None = None
        """The most positions the server takes in one step of this session, as it said
        when it admitted the session (None: it did not say)."""
        self._reading: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._is_closed = False
        self.pushed = False
        """Whether the server pushed its last step's output on to the next hop."""
        self.log: StepLog | None = None  # None: the server commits to nothing

    async def open(self, opening: wire.OpenSessionRequest, *, timeout_s: float) -> None:
        """Starts the stream and waits for the server to admit the session."""
        reader, self._writer = await self._connect(timeout_s)
        self._reading = asyncio.create_task(self._read_forever(reader), name="inference-reader")
        await self._send(runtime_pb2.ExpertRequest(metadata=wire.pack_metadata(opening)), timeout_s)
        ack = await self._receive(timeout_s, is_watched=True)
        self.max_chunk = step_limit(ack)
        try:
            self.log = open_log(ack, opening, server=str(self.span.peer_id), what=self._what())
        except BadReplyError:
            self._abort()
            raise

    async def _connect(self, timeout_s: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """The stream: on the server's local socket when it has one here, else via p2p."""
        span = self.span

        async def through_p2p() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            connecting = open_stream(span.p2p, span.peer_id, INFERENCE_HANDLE)
            _, reader, writer = await within(connecting, timeout_s=timeout_s, what=self._what())
            return reader, writer

        peer_id = span.peer_id.to_base58()
        return await open_preferring_local(
            span.local_socket, peer_id, INFERENCE_HANDLE, through_p2p
        )

    @functools.cached_property
    def push_target(self) -> wire.NextHop:
        """How a previous server of the route names this session to push steps to it."""
        return wire.NextHop(
            peer_id=self.span.peer_id.to_base58(),
            session_id=self.session_id,
            local_socket=self.span.local_socket,
            push_secret=self._push_secret,
        )

    async def step(
        self,
        hidden: torch.Tensor,
        start_pos: int,
        timeout_s: float = 30.0,
        *,
        step_id: int = 0,
        push_to: list[wire.NextHop] | None = None,
        await_push_s: float = 0.0,
    ) -> torch.Tensor:
        """Runs hidden [B, S, H] at positions [start_pos, start_pos + S) through the span.

        A start_pos below the positions sent so far rewinds the server's cache there.
        `step_id` numbers the step within the session (0: unnumbered); `push_to`, the
        later hops of the route, lets the server push its output on to the next one.
        With `await_push_s`, the previous server pushed this step here: its answer is
        awaited that long before the step is sent after all (the push may be lost).

        Raises:
            RemoteSpanError: the stream is already closed (or broke earlier).
            RemoteError, PeerUnavailableError: as for `RemoteSpan`; the stream is closed.
        """
        async with self._lock:
            if self._is_closed:
                raise RemoteSpanError(f"{self._what()}: the inference stream is closed")
            self._reply_limit = reply_bytes(hidden)
            reply = await self._receive_pushed(await_push_s) if await_push_s > 0 else None
            if reply is None:
                # Our own checked values: constructed without validating them again.
                meta = wire.StepRequest.model_construct(
                    session_id=self.session_id,
                    start_pos=start_pos,
                    step_id=step_id,
                    push_to=push_to or [],
                )
                request = runtime_pb2.ExpertRequest(
                    tensors=[framing.pack_tensor(hidden)], metadata=wire.pack_metadata(meta)
                )
                await self._send(request, timeout_s)
                reply = await self._receive(timeout_s, is_watched=True)
                assert reply is not None  # only an expected end returns None
            output = check_output(only_tensor(reply, what=self._what()), hidden, what=self._what())
            what = self._what()
            self.pushed = await take_step_reply(self.log, reply, start_pos, hidden, what=what)
            return output

    async def close(self, timeout_s: float = 5.0) -> None:
        """Tells the server to free the session and ends the stream (idempotent)."""
        async with self._lock:
            if self._is_closed:
                return
            meta = wire.StepRequest(session_id=self.session_id, is_close=True)
            with contextlib.suppress(RemoteSpanError):
                await self._send(
                    runtime_pb2.ExpertRequest(metadata=wire.pack_metadata(meta)), timeout_s
                )
                await self._send(P2P.END_OF_STREAM, timeout_s)
                # The server ends its side once it has seen the close; wait for that, then
                # drop the stream either way: it is of no further use.
                while await self._receive(timeout_s, is_end_expected=True) is not None:
                    pass
            self._abort()

    async def _read_forever(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                frame = await framing.read_frame(reader, max_bytes=self._frame_limit)
                await self._inbox.put(frame)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # the end of the stream, a reset, or garbage
            await self._inbox.put(exc)

    async def _frame_limit(self, length: int) -> int:
        """The bound of a frame of `length` bytes, asked before its body is read.

        A frame longer than the last request's reply may be waits, unread, until the
        caller waits for a reply: a pushed step may be answered before the client sent
        it and set its bound. Then the bound of the reply awaited decides.
        """
        if length > self._reply_limit:
            await self._is_awaited.wait()
        return self._reply_limit

    async def _send(self, message: Message, timeout_s: float) -> None:
        """Writes one message; any failure closes the stream before it is raised."""
        writer = self._writer
        assert writer is not None  # set by open() before any send
        try:
            if writer.is_closing():
                raise ConnectionResetError("the stream is closed")
            writer.write(framing.encode_frame(message))
            await framing.drain_if_full(writer, timeout_s)
        except BaseException as exc:
            reason = self._last_words() if isinstance(exc, CONNECTION_ERRORS) else None
            self._abort()
            if reason is not None:
                raise reason from exc
            if isinstance(exc, CONNECTION_ERRORS):
                raise PeerUnavailableError(f"{self._what()}: sending failed: {exc!r}") from exc
            raise

    def _last_words(self) -> RemoteSpanError | None:
        """The error the server sent before it closed the stream, if one came."""
        while not self._inbox.empty():
            item = self._inbox.get_nowait()
            if isinstance(item, tuple) and item[0] == P2P.ERROR_MARKER:
                with contextlib.suppress(DecodeError):
                    return server_error(_parse(RPCError, item[1]).message, what=self._what())
        return None

    async def _receive_pushed(self, timeout_s: float) -> runtime_pb2.ExpertResponse | None:
        """The answer to a pushed step, or None when none came within timeout_s."""
        self._is_awaited.set()
        try:
            item = await get_within(self._inbox, timeout_s)
        except asyncio.TimeoutError:
            return None  # a get that timed out takes nothing off the queue
        finally:
            self._is_awaited.clear()
        return self._take(item, is_end_expected=False)

    async def _receive(
        self, timeout_s: float, *, is_end_expected: bool = False, is_watched: bool = False
    ) -> runtime_pb2.ExpertResponse | None:
        """The next reply (None at an expected end); any failure closes the stream.

        `is_watched`: the server is pinged while the reply is late (see `Keepalive`), and
        a ping it does not answer fails the wait at once.
        """
        self._is_awaited.set()
        try:
            if is_watched and self._keepalive is not None:
                ping = self.span.info
                item = await get_alive(self._inbox, timeout_s, ping=ping, keepalive=self._keepalive)
            else:
                item = await get_within(self._inbox, timeout_s)
        except BaseException as exc:
            self._abort()
            if isinstance(exc, PeerUnavailableError):
                raise PeerUnavailableError(f"{self._what()}: {exc}") from exc
            if isinstance(exc, CONNECTION_ERRORS):
                raise PeerUnavailableError(f"{self._what()}: no reply in {timeout_s:g} s") from exc
            raise
        finally:
            self._is_awaited.clear()
        return self._take(item, is_end_expected=is_end_expected)

    def _take(
        self, item: tuple[bytes, bytes] | BaseException, *, is_end_expected: bool
    ) -> runtime_pb2.ExpertResponse | None:
        """A received frame as a reply; a failure (or an error frame) closes the stream."""
        if isinstance(item, BaseException):
            self._abort()
            if isinstance(item, asyncio.IncompleteReadError):
                if is_end_expected:
                    return None
                raise PeerUnavailableError(f"{self._what()}: the server closed the stream")
            raise PeerUnavailableError(f"{self._what()}: {type(item).__name__}: {item}") from item
        marker, body = item
        try:
            if marker == P2P.ERROR_MARKER:
                self._abort()  # the server ends the session after an error
                raise server_error(_parse(RPCError, body).message, what=self._what())
            return _parse(runtime_pb2.ExpertResponse, body)
        except DecodeError as exc:
            self._abort()
            raise PeerUnavailableError(f"{self._what()}: a malformed reply ({exc})") from exc

    def _abort(self) -> None:
        self._is_closed = True
        if self._reading is not None:
            self._reading.cancel()
            self._reading = None
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()

    def _what(self) -> str:
        return f"{self.span!r} session {self.session_id!r}"


ParsedMessage = TypeVar("ParsedMessage", bound=Message)


def _parse(kind: type[ParsedMessage], body: bytes) -> ParsedMessage:
    message = kind()
    message.ParseFromString(body)
    return message
