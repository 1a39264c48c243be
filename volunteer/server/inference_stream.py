"""Serving one inference stream: the opening message, then one reply per step, until close.

The first message (`OpenSessionRequest`, no tensors) reserves a KV cache and is
acknowledged; each later message (`StepRequest` plus hidden [B, S, H]) runs one step and
gets the span's output; a message with `is_close`, the end of the stream, an error, or
`idle_timeout_s` without a message ends the session and frees its cache. A failed step
ends its session (the client replays into a fresh one).

Steps also come pushed by the previous server of the route (`volunteer.server.push`):
whichever copy of a step comes first is run and answered, the other is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch
from google.protobuf.message import DecodeError
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.server.caps import Refusals, max_step_bytes
from volunteer.server.push import PushedStep, StepInbox
from volunteer.server.sessions import Session
from volunteer.server.validation import first_request
from volunteer.transport.commitment import LARGE_STEP_ELEMENTS, SessionSigner
from volunteer.transport.protocol import BadRequestError, PeerUnavailableError
from volunteer.transport.upload_limit import UploadLimit

if TYPE_CHECKING:  # the handler serves these streams: a run-time import would be circular
    from volunteer.server.handler import BlockHandler

logger = logging.getLogger(__name__)


async def serve_inference_stream(
    handler: BlockHandler,
    peer: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    upload: UploadLimit | None = None,
) -> None:
    """An inference stream from `peer` (over p2p, or a local link: see
    `volunteer.transport.local_link`), until it ends.

    Read and answered here rather than through hivemind's stream RPC machinery, which
    takes a new task, a wait and two queue hand-offs per message. The framing is
    hivemind's; an error ends the stream with an error frame as hivemind's handlers do,
    whose text names the reason.
    """
    messages = client_messages(reader, max_bytes=max_step_bytes(handler))
    replies = inference_session(handler, messages, peer=peer)
    await write_replies(
        replies,
        reader,
        writer,
        peer=peer,
        timeout_s=handler.limits.idle_timeout_s,
        refusals=handler.refusals,
        upload=upload,
    )


async def write_replies(
    replies: AsyncIterator[runtime_pb2.ExpertResponse],
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    peer: str,
    timeout_s: float,
    refusals: Refusals,
    upload: UploadLimit | None = None,
) -> None:
    """Writes each reply of a stream, then closes it; an error ends it with an error
    frame naming the reason (a peer that does not read for timeout_s is left). Each
    reply first waits for room under `upload` (the owner's cap; None: a local link).

    The error is sent as a refusal (see `Refusals`): the peer may have written more
    than was read (a frame refused from its header, steps sent ahead), and closing
    on unread bytes resets the stream, which can drop the reason on its way.
    """
    failure: Exception | None = None
    with contextlib.closing(writer):
        try:
            async for reply in replies:
                frame = framing.encode_frame(reply)
                if upload is not None:
                    await upload.spend(len(frame))
                writer.write(frame)
                await framing.drain_if_full(writer, timeout_s)
        except (OSError, asyncio.TimeoutError):
            return  # the client went away or stopped reading: nobody to tell
        except Exception as exc:
            level = logging.DEBUG if isinstance(exc, wire.RemoteSpanError) else logging.WARNING
            logger.log(level, "stream of %s failed: %s", peer, exc)
            failure = exc
        finally:
            # First: a session's inbox task reads the stream until it is closed here.
            await replies.aclose()  # type: ignore[attr-defined]  # an async generator
        if failure is not None:
            await refusals.refuse(reader, writer, failure)


async def inference_session(
    handler: BlockHandler, requests: AsyncIterator[runtime_pb2.ExpertRequest], *, peer: str
) -> AsyncIterator[runtime_pb2.ExpertResponse]:
    """An inference session: open, then one reply per step, until close."""
    opening = await first_request(requests, timeout_s=handler.caps.first_message_s)
    session, opened = await _open_session(handler, opening, peer=peer)
    session.last_step_id = opened.next_step_id - 1
    log_context = f"peer {peer}, session {session.session_id!r}"
    logger.debug("opened inference session (%s)", log_context)
    inbox = StepInbox(
        requests, idle_timeout_s=handler.limits.idle_timeout_s, push_secret=opened.push_secret
    )
    session.inbox = inbox
    signer = None
    if handler.signer is not None:
        signer = handler.signer.open_session(
            client=peer,
            session_id=session.session_id,
            start=session.start,
            end=session.end,
            dtype=str(handler.dtype).removeprefix("torch."),
        )
    try:
        limits = handler.limits
        max_chunk = max(1, min(limits.max_chunk, limits.max_tokens // opened.batch_size))
        yield _step_reply(session, max_chunk=max_chunk, signer=signer)
        while (item := await inbox.next()) is not None:
            if isinstance(item, PushedStep):
                meta, hidden = item.meta, item.hidden
            elif (step := await _client_step(handler, session, inbox, item)) is None:
                return  # closed
            else:
                meta, hidden = step
            if 0 < meta.step_id <= session.last_step_id:
                continue  # the other copy of this step was run and answered
            # Built before the compute, which leaves every cache cold.
            push = _push_metadata(meta) if meta.push_to else None
            try:
                output = await handler.run_step(session, hidden, meta.start_pos)
            except BadRequestError as exc:
                if not isinstance(item, PushedStep):
                    raise
                # A push is a shortcut: the client's own copy of the step still comes.
                logger.debug("dropped a pushed step (%s): %s", log_context, exc)
                continue
            packed = framing.pack_tensor(output)
            session.last_step_id = max(session.last_step_id, meta.step_id)
            if isinstance(item, PushedStep):
                handler.stats.pushed_steps += 1
            pushed = push is not None and _push(handler, *push, packed)
            signed = await _sign(signer, meta.start_pos, hidden, packed)
            yield _step_reply(session, packed, pushed=pushed, signed=signed)
    finally:
        # However the stream ends (close, error, timeout, cancellation), free the cache.
        session.inbox = None
        inbox.close()
        handler.end_session(session)
        logger.debug("closed inference session (%s)", log_context)


async def _open_session(
    handler: BlockHandler, request: runtime_pb2.ExpertRequest, *, peer: str
) -> tuple[Session, wire.OpenSessionRequest]:
    try:
        meta = wire.unpack_metadata(request.metadata, wire.OpenSessionRequest)
    except BadRequestError as exc:
        reason = str(exc).removeprefix(BadRequestError.marker)
        raise BadRequestError(f"the first message must open a session: {reason}") from exc
    if request.tensors:
        raise BadRequestError("the opening message carries no tensors")
    return await handler.open_session(meta, peer=peer), meta


async def _client_step(
    handler: BlockHandler,
    session: Session,
    inbox: StepInbox,
    request: runtime_pb2.ExpertRequest,
) -> tuple[wire.StepRequest, torch.Tensor] | None:
    """A message of the client's stream as a step; None when it closes the session
    (and the stream then ended, as it must)."""
    meta = wire.unpack_metadata(request.metadata, wire.StepRequest)
    if meta.session_id != session.session_id:
        raise BadRequestError(
            f"unknown session id {meta.session_id!r} (this stream is {session.session_id!r})"
        )
    if meta.is_close:
        if await inbox.next_from_client() is not None:
            raise BadRequestError("unexpected message: no messages may follow the close")
        return None
    (hidden,) = handler.hidden_tensors(request, count=1)
    return meta, hidden


def _push_metadata(meta: wire.StepRequest) -> tuple[wire.NextHop, bytes]:
    """Where a step's output is to be pushed and the metadata it goes with."""
    target, rest = meta.push_to[0], meta.push_to[1:]
    # Built from checked values: constructed without validating them again.
    pushed = wire.StepRequest.model_construct(
        session_id=target.session_id,
        start_pos=meta.start_pos,
        step_id=meta.step_id,
        push_to=rest,
        push_secret=target.push_secret,
    )
    return target, wire.pack_metadata(pushed)


def _push(
    handler: BlockHandler, target: wire.NextHop, metadata: bytes, output: runtime_pb2.Tensor
) -> bool:
    """Sends a step's output on to the next server; False when there is no open link to
    it (yet), or the handler is shutting down."""
    if handler.push_links is None:
        return False
    request = runtime_pb2.ExpertRequest(tensors=[output], metadata=metadata)
    return handler.push_links.send(target, request)


async def _sign(
    signer: SessionSigner | None, start_pos: int, hidden: torch.Tensor, output: runtime_pb2.Tensor
) -> tuple[bytes | None, bytes | None]:
    """The step's chain and signature (none without a signer)."""
    if signer is None:
        return None, None
    if hidden.numel() < LARGE_STEP_ELEMENTS:
        return signer.step(start_pos, hidden, output)
    return await asyncio.to_thread(signer.step, start_pos, hidden, output)


def _step_reply(
    session: Session,
    output: runtime_pb2.Tensor | None = None,
    *,
    pushed: bool = False,
    max_chunk: int | None = None,
    signer: SessionSigner | None = None,
    signed: tuple[bytes | None, bytes | None] = (None, None),
) -> runtime_pb2.ExpertResponse:
    """A step's reply (the open's acknowledgement: no output, and the session's
    certificate from its `signer`); `signed` is the step's chain and signature."""
    length = session.cache.length if session.cache is not None else 0
    certificate = signer.certificate if signer is not None else None
    # Our own values: constructed without validating them.
    meta = wire.StepReply.model_construct(
        session_id=session.session_id,
        length=length,
        pushed=pushed,
        max_chunk=max_chunk,
        certificate=certificate.body if certificate else None,
        certificate_signature=certificate.signature if certificate else None,
        chain=signed[0],
        signature=signed[1],
    )
    tensors = [] if output is None else [output]
    return runtime_pb2.ExpertResponse(tensors=tensors, metadata=wire.pack_metadata(meta))


async def client_messages(
    reader: asyncio.StreamReader, *, max_bytes: int
) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """The messages of a client's stream, until it ends its side (hivemind's end-of-stream
    frame) or the connection closes.

    Raises:
        BadRequestError: a frame that is not hivemind's, one over max_bytes, or a body
            that is not an `ExpertRequest`.
    """
    while True:
        try:
            marker, body = await framing.read_frame(reader, max_bytes=max_bytes)
        except asyncio.IncompleteReadError:
            return
        except PeerUnavailableError as exc:
            raise BadRequestError(str(exc)) from exc
        if marker == P2P.ERROR_MARKER:
            return
        request = runtime_pb2.ExpertRequest()
        try:
            request.ParseFromString(body)
        except DecodeError as exc:
            raise BadRequestError(f"not a protobuf message ({exc})") from exc
        yield request
