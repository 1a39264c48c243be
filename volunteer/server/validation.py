"""Checks of what a request may ask of a block server: its span, its tensors, its limits,
and how many messages its stream carries.

Every check raises `BadRequestError` with a text that names the reason; hivemind carries
that text to the caller. Nothing here keeps state: the handler passes in what it serves.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import time
from collections.abc import AsyncIterator

import torch
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.models.adapters import AdapterLayout, SpanAdapter
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan
from volunteer.server.sessions import Session
from volunteer.transport.protocol import BadRequestError, SessionExpiredError

MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class ServerLimits:
    """What one request may ask of this server."""

    max_batch: int
    max_chunk: int
    """Most new positions per request (S)."""
    max_tokens: int
    """Most positions per request over the whole batch (B * S)."""
    max_length: int
    """The model's context: the longest session."""
    idle_timeout_s: float
    """A stream that sends nothing for this long is closed and its cache freed."""


def check_span(span: BlockSpan, meta: wire.SpanRequest) -> None:
    """Blocks [start, end) must lie inside the served span (a sub-span is allowed)."""
    if not span.start <= meta.start < meta.end <= span.end:
        raise BadRequestError(
            f"blocks [{meta.start}, {meta.end}) are not inside the served span "
            f"[{span.start}, {span.end})"
        )


def check_open(meta: wire.OpenSessionRequest, limits: ServerLimits) -> None:
    """A session's batch and length must fit the server's limits."""
    if meta.batch_size > limits.max_batch:
        raise BadRequestError(f"batch_size {meta.batch_size} exceeds max_batch {limits.max_batch}")
    if meta.max_length > limits.max_length:
        raise BadRequestError(
            f"max_length {meta.max_length} exceeds the model's context of {limits.max_length}"
        )


def hidden_tensors(
    request: runtime_pb2.ExpertRequest,
    *,
    count: int,
    hidden_size: int,
    limits: ServerLimits,
    dtype: torch.dtype,
    adapter_tensors: int = 0,
) -> list[torch.Tensor]:
    """The request's first `count` tensors, each read and checked as hidden states within
    the limits (`adapter_tensors` more follow them: see `call_adapter`)."""
    if len(request.tensors) != count + adapter_tensors:
        expected = count + adapter_tensors
        raise BadRequestError(f"expected {expected} tensor(s), got {len(request.tensors)}")
    tensors = []
    for index, proto in enumerate(request.tensors[:count]):
        tensor = framing.unpack_hidden(
            proto, hidden_size=hidden_size, max_positions=limits.max_tokens, name=f"tensor {index}"
        )
        check_limits(tensor, limits, dtype)
        tensors.append(tensor)
    return tensors


def check_hidden(
    hidden: torch.Tensor, *, hidden_size: int, limits: ServerLimits, dtype: torch.dtype
) -> None:
    """The checks of `hidden_tensors`, for a tensor that came in-process."""
    if hidden.dim() != 3 or hidden.shape[2] != hidden_size:
        raise BadRequestError(
            f"hidden states must be [batch, seq, {hidden_size}], got {list(hidden.shape)}"
        )
    check_limits(hidden, limits, dtype)


def check_limits(tensor: torch.Tensor, limits: ServerLimits, dtype: torch.dtype) -> None:
    """B <= max_batch, S <= max_chunk, B * S <= max_tokens; float32 or the served dtype."""
    batch, seq, _ = tensor.shape
    if batch > limits.max_batch:
        raise BadRequestError(f"batch {batch} exceeds max_batch {limits.max_batch}")
    if seq > limits.max_chunk:
        raise BadRequestError(f"{seq} positions exceed max_chunk {limits.max_chunk}")
    if batch * seq > limits.max_tokens:
        raise BadRequestError(f"{batch * seq} positions exceed max_tokens {limits.max_tokens}")
    if tensor.dtype not in (torch.float32, dtype):
        raise BadRequestError(f"dtype {tensor.dtype} not accepted: send float32 or {dtype}")
    # A server signs what it computed: NaN in would be NaN out, signed, and a recomputation
    # of NaN never "agrees" with it, so whoever sent it could have the server accused.
    if not torch.isfinite(tensor).all():
        raise BadRequestError("hidden states hold NaN or infinite values")


def check_backward(hidden: torch.Tensor, max_backward_tokens: int) -> None:
    """A backward call may hold autograd activations for at most the positions that the
    memory plan reserved (`max_backward_tokens`)."""
    positions = hidden.shape[0] * hidden.shape[1]
    if positions > max_backward_tokens:
        raise BadRequestError(
            f"backward of {positions} positions exceeds max_backward_tokens {max_backward_tokens}"
        )


def check_step(session: Session, hidden: torch.Tensor, start_pos: int) -> None:
    """A step must fit its session: its lifetime, its batch, no gap after the cached
    positions (a rewind below them is allowed), and no position past its max_length.

    Raises:
        SessionExpiredError: the session has lived its max_session_s.
        BadRequestError: the step does not fit it.
    """
    if time.monotonic() > session.expires_at:
        raise SessionExpiredError("the session outlived max_session_s; open a new one")
    batch, seq, _ = hidden.shape
    if batch != session.batch_size:
        raise BadRequestError(f"batch {batch} != the session's batch_size {session.batch_size}")
    assert session.cache is not None  # admitted sessions always hold a cache
    if start_pos > session.cache.length:
        raise BadRequestError(
            f"start_pos {start_pos} skips past the {session.cache.length} cached positions"
        )
    if start_pos + seq > session.max_length:
        raise BadRequestError(
            f"start_pos {start_pos} + {seq} positions exceed the session's "
            f"max_length {session.max_length}"
        )


async def first_request(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], *, timeout_s: float
) -> runtime_pb2.ExpertRequest:
    """The stream's first message.

    Raises:
        BadRequestError: the stream ended before it, or it did not come within timeout_s
            (a stream that opens and stays silent only holds a slot).
    """
    try:
        request = await next_request(requests, timeout_s=timeout_s)
    except SessionExpiredError:
        raise BadRequestError(f"no request within {timeout_s:g} s of opening the stream") from None
    if request is None:
        raise BadRequestError("the request stream ended before its first message")
    return request


async def opened_within(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], *, timeout_s: float
) -> AsyncIterator[runtime_pb2.ExpertRequest]:
    """`requests`, whose first message must come within timeout_s (see `first_request`)."""
    yield await first_request(requests, timeout_s=timeout_s)
    async for request in requests:
        yield request


async def only_request(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], *, timeout_s: float
) -> runtime_pb2.ExpertRequest:
    """The one message of a forward/backward stream, once the caller ended its side.

    Replying (or ending our side) before that would cut the connection under the
    caller's last write, which it would see as a broken pipe instead of our answer.
    """
    request = await first_request(requests, timeout_s=timeout_s)
    if await next_request(requests, timeout_s=timeout_s) is not None:
        raise BadRequestError("unexpected message: a forward/backward stream carries one message")
    return request


async def next_request(
    requests: AsyncIterator[runtime_pb2.ExpertRequest], *, timeout_s: float
) -> runtime_pb2.ExpertRequest | None:
    """The next message, or None at the end of the stream."""
    try:
        return await asyncio.wait_for(anext(requests), timeout_s)
    except StopAsyncIteration:
        return None
    except asyncio.TimeoutError:
        raise SessionExpiredError(f"no message for {timeout_s:g} s; stream closed") from None


def adapter_layout(meta: wire.SpanRequest) -> AdapterLayout | None:
    """The layout of the call's adapter, or None when it carries none."""
    spec = meta.adapter
    if spec is None or (not spec.prompt_len and not spec.rank):
        return None
    try:
        return AdapterLayout(spec.prompt_len, spec.rank, tuple(spec.targets), spec.scale)
    except ValueError as exc:
        raise BadRequestError(f"adapter: {exc}") from None


def call_adapter(
    request: runtime_pb2.ExpertRequest,
    meta: wire.SpanRequest,
    layout: AdapterLayout,
    *,
    config: ModelConfig,
    skip: int,
    max_bytes: int,
) -> SpanAdapter:
    """The call's adapter tensors, which follow its `skip` hidden-state tensors: their
    size is checked against `max_bytes` (as float32) before any is read, then each one's
    shape against the layout's for the call's blocks.

    Raises:
        BadRequestError: an adapter over the cap, or tensors that are not the layout's.
    """
    shapes = layout.shapes(config, meta.end - meta.start)
    size = sum(math.prod(shape) for shape in shapes) * 4
    if size > max_bytes:
        raise BadRequestError(
            f"an adapter of {_size(size)} for blocks [{meta.start}, {meta.end}) exceeds "
            f"this server's cap of {_size(max_bytes)} (max_adapter_mib)"
        )
    tensors = []
    for number, (proto, shape) in enumerate(zip(request.tensors[skip:], shapes, strict=True)):
        name = f"adapter tensor {number}"
        tensor = framing.unpack_tensor(proto, max_numel=math.prod(shape), name=name)
        if tuple(tensor.shape) != shape:
            raise BadRequestError(f"{name} is {list(tensor.shape)}, not {list(shape)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise BadRequestError(f"{name} holds NaN or infinite values, or is not floating")
        tensors.append(tensor.float())
    return SpanAdapter(layout, tuple(tensors))


def _size(count: int) -> str:
    return f"{count / MIB:.3g} MiB" if count >= MIB else f"{count / 1024:.3g} KiB"
