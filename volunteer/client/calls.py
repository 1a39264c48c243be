"""Remote calls that end: a timeout on each, failures translated to our errors, and one
request's one reply read within a bound.

hivemind's stream call (`P2P.call_protobuf_handler` given a stream of requests) reads a
reply with `readexactly(n)` of whatever length the server wrote: a hostile server that
claims a huge reply makes the client wait for it and buffer what comes. `call_once`
checks the length against the largest valid reply before a byte of the body is read;
the framing is hivemind's, so the server's handlers serve both callers alike.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, P2PDaemonError, P2PHandlerError, PeerID
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
from volunteer.client.replies import server_error
from volunteer.transport.p2p_streams import open_stream
from volunteer.transport.protocol import BadReplyError, PeerUnavailableError

Reply = TypeVar("Reply")

CONNECTION_ERRORS = (
    asyncio.TimeoutError,
    asyncio.IncompleteReadError,
    P2PDaemonError,
    ConnectionError,
    OSError,
)
"""What a dead, unreachable or misbehaving connection raises inside hivemind's client."""


async def within(awaitable: Awaitable[Reply], *, timeout_s: float, what: str) -> Reply:
    """Awaits one remote call with a timeout, translating failures to our errors.

    Raises:
        RemoteError: the server answered with an error (hivemind's `P2PHandlerError`).
        BadReplyError: it answered with bytes that are no reply.
        PeerUnavailableError: no answer in time, or the connection failed.
    """
    try:
        return await asyncio.wait_for(awaitable, timeout_s)
    except P2PHandlerError as exc:
        raise server_error(str(exc), what=what) from exc
    except CONNECTION_ERRORS as exc:
        raise PeerUnavailableError(f"{what}: {type(exc).__name__}: {exc}") from exc
    except DecodeError as exc:  # a unary call's reply that is not its message
        raise BadReplyError(f"{what} answered with a malformed reply ({exc})") from exc


async def call_once(
    p2p: P2P,
    peer_id: PeerID,
    handle: str,
    request: runtime_pb2.ExpertRequest,
    *,
    max_reply_bytes: int,
    timeout_s: float,
    what: str,
) -> runtime_pb2.ExpertResponse:
    """Sends `request` to `handle` on `peer_id` and reads its reply (no timeout of its
    own: the caller bounds the whole call, as `within` does).

    Raises:
        RemoteError: the server answered with an error (see `replies.server_error`).
        BadReplyError: a reply that is not an `ExpertResponse`.
        PeerUnavailableError: a reply over max_reply_bytes, or an unknown marker.
        asyncio.IncompleteReadError, ConnectionError, P2PDaemonError: the stream failed.
    """
    _, reader, writer = await open_stream(p2p, peer_id, handle)
    try:
        writer.write(framing.encode_frame(request) + framing.encode_frame(P2P.END_OF_STREAM))
        await framing.drain_if_full(writer, timeout_s)
        marker, body = await framing.read_frame(reader, max_bytes=max_reply_bytes)
    finally:
        writer.close()
    try:
        if marker == P2P.ERROR_MARKER:
            error = RPCError()
            error.ParseFromString(body)
            raise server_error(error.message, what=what)
        reply = runtime_pb2.ExpertResponse()
        reply.ParseFromString(body)
    except DecodeError as exc:
        raise BadReplyError(f"{what} answered with a malformed reply ({exc})") from exc
    return reply
