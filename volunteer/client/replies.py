"""Checks on what a server answers: a reply that is not what was asked for is the server's
failure (`BadReplyError`, which routing treats as a server down), never the user's.

A server may answer with an unexplained error, garbage, a tensor of the wrong shape or
dtype, NaN or inf, or a frame far larger than any valid reply: each is caught here, before
the value reaches the next hop or the sampler, so the client fails over to another
replica instead of ending the session or decoding nonsense.
"""

from __future__ import annotations

import asyncio

import torch
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.transport.commitment import LARGE_STEP_ELEMENTS, CommitmentError, SignedCertificate
from volunteer.transport.protocol import BadReplyError, RemoteError, RemoteSpanError
from volunteer.trust.step_log import StepLog

MAX_REPLY_NUMEL = 1 << 30
"""The most elements a reply's tensor may declare: its frame is bounded before it is read
(`reply_bytes`), this only keeps a header from asking for more than any reply holds."""
REPLY_OVERHEAD_BYTES = wire.MAX_METADATA_BYTES + 1024
"""A reply's metadata and protobuf framing around its tensor."""
OPEN_REPLY_BYTES = REPLY_OVERHEAD_BYTES
"""The open's acknowledgement: metadata only."""


def reply_bytes(like: torch.Tensor) -> int:
    """The largest valid reply to a step on `like`: a tensor of its shape (at 4 bytes an
    element: hivemind's legacy layout sends bfloat16 as float32) and its metadata."""
    return like.numel() * 4 + REPLY_OVERHEAD_BYTES


def server_error(message: str, *, what: str) -> RemoteSpanError:
    """A server's error text as our error: a marked one (busy, bad request, expired) as
    its class; anything else, a failure of the server's own (`BadReplyError`)."""
    error = wire.classify_remote_error(wire.printable(message))
    if type(error) is RemoteError:
        return BadReplyError(f"{what} failed: {error}")
    return error


def only_tensor(reply: runtime_pb2.ExpertResponse | None, *, what: str) -> torch.Tensor:
    """The one tensor of a reply.

    Raises:
        BadReplyError: none, several, or one that does not decode.
    """
    if reply is None or len(reply.tensors) != 1:
        count = 0 if reply is None else len(reply.tensors)
        raise BadReplyError(f"{what} answered with {count} tensors instead of 1")
    try:
        return framing.unpack_tensor(reply.tensors[0], max_numel=MAX_REPLY_NUMEL)
    except wire.BadRequestError as exc:
        reason = str(exc).removeprefix(wire.BadRequestError.marker)
        raise BadReplyError(f"{what} answered with a bad tensor: {reason}") from exc


def check_output(output: torch.Tensor, like: torch.Tensor, *, what: str) -> torch.Tensor:
    """`output`, once it has `like`'s shape and dtype and only finite values (a span maps
    hidden states to hidden states of the same shape and dtype).

    Raises:
        BadReplyError: it does not.
    """
    if output.shape != like.shape or output.dtype != like.dtype:
        raise BadReplyError(
            f"{what} answered {output.dtype} {list(output.shape)} "
            f"for {like.dtype} {list(like.shape)}"
        )
    if not torch.isfinite(output).all():
        raise BadReplyError(f"{what} answered NaN or infinite values")
    return output


def step_limit(reply: runtime_pb2.ExpertResponse | None) -> int | None:
    """The most positions per step that a server's acknowledgement of a session says it
    takes (None: it says nothing usable; a replay then goes in the steps first sent)."""
    if reply is None:
        return None
    try:
        return wire.unpack_metadata(reply.metadata, wire.StepReply).max_chunk
    except wire.BadRequestError:
        return None


def open_log(
    reply: runtime_pb2.ExpertResponse | None,
    opening: wire.OpenSessionRequest,
    *,
    server: str,
    what: str,
) -> StepLog | None:
    """The log of the session's signed steps, from the certificate in the server's
    acknowledgement (None: the server commits to nothing; see `volunteer.trust.step_log`).

    Raises:
        BadReplyError: a certificate that is not the server's, or not of this session.
    """
    try:
        meta = wire.unpack_metadata(reply.metadata, wire.StepReply) if reply else None
    except wire.BadRequestError:
        return None  # step_limit said the same: an acknowledgement of no use
    if meta is None or meta.certificate is None:
        return None
    certificate = SignedCertificate(meta.certificate, meta.certificate_signature or b"")
    try:
        return StepLog(
            certificate,
            server=server,
            session_id=opening.session_id,
            start=opening.start,
            end=opening.end,
        )
    except CommitmentError as exc:
        raise BadReplyError(f"{what}: {exc}") from None


async def take_step_reply(
    log: StepLog | None,
    reply: runtime_pb2.ExpertResponse,
    start_pos: int,
    hidden: torch.Tensor,
    *,
    what: str,
) -> bool:
    """Reads a step's reply metadata once: adds the step to the session's log (if it
    has one; a large step is hashed off the event loop), and says whether the server
    pushed the output on to the next hop.

    Raises:
        BadReplyError: the session has a log, and the reply's commitment is missing or
            not over this step.
    """
    try:
        meta = wire.unpack_metadata(reply.metadata, wire.StepReply)
    except wire.BadRequestError as exc:
        if log is not None:
            raise BadReplyError(f"{what}: {exc}") from None
        return False  # a server that says nothing pushed nothing we should wait for
    if log is not None:
        step = (start_pos, hidden, reply.tensors[0], meta.chain, meta.signature)
        try:
            if hidden.numel() < LARGE_STEP_ELEMENTS:
                log.follow(*step)
            else:
                await asyncio.to_thread(log.follow, *step)
        except CommitmentError as exc:
            raise BadReplyError(f"{what}: {exc}") from None
    return meta.pushed
