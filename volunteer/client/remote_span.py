"""Calls to one server's span of blocks: info, forward, backward and inference streams.

Every call has a timeout. Failures come out as `volunteer.server.protocol` errors: a
`RemoteError` (`BusyError`, `BadRequestError`, `SessionExpiredError`) when the server
answered with one, a `PeerUnavailableError` when it could not be reached or did not
answer in time. Retrying, and choosing another server, is the caller's business.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import torch
from hivemind.compression.serialization import deserialize_torch_tensor
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2

import volunteer.server.protocol as wire
from volunteer.server.handler import BlockHandler
from volunteer.server.protocol import PeerUnavailableError, RemoteSpanError

Reply = TypeVar("Reply")

# What a dead, unreachable or misbehaving connection raises inside hivemind's client.
_CONNECTION_ERRORS = (
    asyncio.TimeoutError,
    asyncio.IncompleteReadError,
    P2PDaemonError,
    ConnectionError,
    OSError,
)


async def _call(awaitable: Awaitable[Reply], *, timeout_s: float, what: str) -> Reply:
    """Awaits one remote call with a timeout, translating failures to our errors."""
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except P2PHandlerError as exc:
        raise wire.classify_remote_error(str(exc)) from exc
    except _CONNECTION_ERRORS as exc:
        raise PeerUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except ValueError as exc:
        # hivemind's single-reply stream call raises this when the stream ends empty,
        # which is what a server that dropped the connection looks like.
        raise PeerUnavailableError(f"{what}: no reply ({exc})") from exc


class RemoteSpan:
    """Blocks [start, end) served by one peer."""

    def __init__(self, *, p2p: P2P, peer_id: PeerID, start: int, end: int) -> None:
        self.p2p = p2p
        self.peer_id = peer_id
        self.start = start
        self.end = end
        self._stub = BlockHandler.get_stub(p2p, peer_id)

    def __repr__(self) -> str:
        return f"RemoteSpan({self.peer_id}, [{self.start}, {self.end}))"

    async def info(self, timeout_s: float = 10.0) -> wire.InfoReply:
        """The server's span, model, dtype, limits and free cache."""
        reply = await _call(
            self._stub.rpc_info(runtime_pb2.ExpertUID()), timeout_s=timeout_s, what=repr(self)
        )
        return wire.unpack_metadata(reply.metadata, wire.InfoReply)

    async def forward(self, hidden: torch.Tensor, timeout_s: float = 60.0) -> torch.Tensor:
        """Hidden states [B, S, H] through the span (no cache); same dtype back."""
        reply = await self._single(self._stub.rpc_forward, [hidden], timeout_s)
        return _only_tensor(reply, self)

    async def backward(
        self, hidden: torch.Tensor, grad_outputs: torch.Tensor, timeout_s: float = 60.0
    ) -> torch.Tensor:
        """The gradient of the span's inputs, given its inputs and its outputs' gradient."""
        reply = await self._single(self._stub.rpc_backward, [hidden, grad_outputs], timeout_s)
        return _only_tensor(reply, self)

    async def open_inference(
        self,
        *,
        max_length: int,
        batch_size: int,
        timeout_s: float = 30.0,
        session_id: str | None = None,
    ) -> InferenceStream:
        """Opens an inference session holding a KV cache on the server.

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
        )
        stream = InferenceStream(span=self, session_id=opening.session_id)
        await stream.open(opening, timeout_s=timeout_s)
        return stream

    async def _single(
        self, method: object, tensors: list[torch.Tensor], timeout_s: float
    ) -> runtime_pb2.ExpertResponse:
        meta = wire.SpanRequest(start=self.start, end=self.end)
        request = runtime_pb2.ExpertRequest(
            tensors=[wire.pack_tensor(t) for t in tensors], metadata=wire.pack_metadata(meta)
        )
        # One message over a stream, so that big tensors avoid the unary size limit.
        call = method(_one(request))  # type: ignore[operator]
        return await _call(call, timeout_s=timeout_s, what=repr(self))


class InferenceStream:
    """One inference session on one server: steps go in order, one at a time."""

    def __init__(self, *, span: RemoteSpan, session_id: str) -> None:
        self.span = span
        self.session_id = session_id
        self._outbox: asyncio.Queue[runtime_pb2.ExpertRequest | None] = asyncio.Queue()
        self._responses: AsyncIterator[runtime_pb2.ExpertResponse] | None = None
        self._lock = asyncio.Lock()
        self._is_closed = False

    async def open(self, opening: wire.OpenSessionRequest, *, timeout_s: float) -> None:
        """Starts the stream and waits for the server to admit the session."""
        await self._outbox.put(runtime_pb2.ExpertRequest(metadata=wire.pack_metadata(opening)))
        call = self.span._stub.rpc_inference(self._drain_outbox())
        self._responses = await _call(call, timeout_s=timeout_s, what=self._what())
        await self._receive(timeout_s)

    async def step(
        self, hidden: torch.Tensor, start_pos: int, timeout_s: float = 30.0
    ) -> torch.Tensor:
        """Runs hidden [B, S, H] at positions [start_pos, start_pos + S) through the span.

        A start_pos below the positions sent so far rewinds the server's cache there.

        Raises:
            RemoteSpanError: the stream is already closed (or broke earlier).
            RemoteError, PeerUnavailableError: as for `RemoteSpan`; the stream is closed.
        """
        async with self._lock:
            if self._is_closed:
                raise RemoteSpanError(f"{self._what()}: the inference stream is closed")
            meta = wire.StepRequest(session_id=self.session_id, start_pos=start_pos)
            request = runtime_pb2.ExpertRequest(
                tensors=[wire.pack_tensor(hidden)], metadata=wire.pack_metadata(meta)
            )
            await self._outbox.put(request)
            reply = await self._receive(timeout_s)
            return _only_tensor(reply, self.span)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Tells the server to free the session and ends the stream (idempotent)."""
        async with self._lock:
            if self._is_closed:
                return
            meta = wire.StepRequest(session_id=self.session_id, is_close=True)
            await self._outbox.put(runtime_pb2.ExpertRequest(metadata=wire.pack_metadata(meta)))
            await self._outbox.put(None)
            # The server ends its side once it has seen the close; wait for that, then
            # drop the stream either way: it is of no further use.
            with contextlib.suppress(RemoteSpanError):
                while await self._receive(timeout_s, is_end_expected=True) is not None:
                    pass
            await self._abort()

    async def _receive(
        self, timeout_s: float, *, is_end_expected: bool = False
    ) -> runtime_pb2.ExpertResponse | None:
        """The next reply; any failure closes the stream before it is raised."""
        assert self._responses is not None  # set by open() before any receive
        try:
            return await _call(anext(self._responses), timeout_s=timeout_s, what=self._what())
        except StopAsyncIteration:
            await self._abort()
            if is_end_expected:
                return None
            raise PeerUnavailableError(f"{self._what()}: the server ended the stream") from None
        except BaseException:
            await self._abort()
            raise

    async def _abort(self) -> None:
        self._is_closed = True
        self._outbox.put_nowait(None)  # lets hivemind's writer finish
        if self._responses is not None:
            responses, self._responses = self._responses, None
            # Closing hivemind's reply generator also closes the connection.
            await responses.aclose()  # type: ignore[attr-defined]

    async def _drain_outbox(self) -> AsyncIterator[runtime_pb2.ExpertRequest]:
        while (request := await self._outbox.get()) is not None:
            yield request

    def _what(self) -> str:
        return f"{self.span!r} session {self.session_id!r}"


async def _one(request: runtime_pb2.ExpertRequest) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    yield request


def _only_tensor(reply: runtime_pb2.ExpertResponse | None, span: RemoteSpan) -> torch.Tensor:
    if reply is None or len(reply.tensors) != 1:
        count = 0 if reply is None else len(reply.tensors)
        raise wire.RemoteError(f"{span!r} answered with {count} tensors instead of 1")
    return deserialize_torch_tensor(reply.tensors[0])
