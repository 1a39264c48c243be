"""How bytes travel between peers: hivemind's stream frames, and tensors in its layout.

A frame is a marker byte, an 8-byte length and a body, exactly as hivemind frames a stream
RPC's messages, so hivemind's own callers and ours read each other. Tensors are
`runtime_pb2.Tensor` messages, uncompressed, packed and checked by our own code: a header
is checked before its buffer is touched, and no reader allocates beyond its bound.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable

import torch
from google.protobuf.message import Message
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

from volunteer.transport.protocol import BadRequestError, PeerUnavailableError

# Wire dtype names a client may send (hivemind's serializer names, without "torch.").
_WIRE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def encode_frame(message: Message) -> bytes:
    """One message framed as hivemind frames stream messages: marker, 8-byte length, body
    (the error marker for an `RPCError`: an error, or hivemind's end of stream)."""
    marker = P2P.ERROR_MARKER if isinstance(message, RPCError) else P2P.MESSAGE_MARKER
    return frame_bytes(message.SerializeToString(), marker)


def frame_bytes(body: bytes, marker: bytes = P2P.MESSAGE_MARKER) -> bytes:
    """`body` framed as `encode_frame` frames a message."""
    return marker + len(body).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + body


async def drain_if_full(writer: asyncio.StreamWriter, timeout_s: float) -> None:
    """Waits (at most timeout_s) for the writer to drain, only when it holds bytes the
    socket did not take yet: the usual step leaves nothing behind, and a wait bounded
    by `asyncio.wait_for` costs a task per message on Python 3.10-3.11.

    Raises:
        ConnectionError: the connection was lost. asyncio.TimeoutError: the peer does
            not read.
    """
    if writer.transport.get_write_buffer_size() == 0:
        return
    await asyncio.wait_for(writer.drain(), timeout_s)


async def read_frame(
    reader: asyncio.StreamReader, *, max_bytes: int | Callable[[int], Awaitable[int]]
) -> tuple[bytes, bytes]:
    """One framed message (see `encode_frame`), or an error frame: marker and body.

    `max_bytes` may be a function of the frame's length, awaited once the length has
    come and before any of the body is read: a reader that waits ahead for replies may
    hold a frame there until it knows what the reply may be.

    Raises:
        asyncio.IncompleteReadError: the stream ended.
        PeerUnavailableError: an unknown marker, or a length over max_bytes (a broken or
            hostile peer must not make us allocate without bound).
    """
    marker = await reader.readexactly(1)
    if marker not in (P2P.MESSAGE_MARKER, P2P.ERROR_MARKER):
        raise PeerUnavailableError(f"a message with an unknown marker {marker!r}")
    length = int.from_bytes(await reader.readexactly(P2P.HEADER_LEN), P2P.BYTEORDER)
    limit = max_bytes if isinstance(max_bytes, int) else await max_bytes(length)
    if length > limit:
        raise PeerUnavailableError(f"a message of {length} bytes exceeds {limit}")
    return marker, await reader.readexactly(length)


def pack_tensor(tensor: torch.Tensor) -> runtime_pb2.Tensor:
    """Serializes a tensor (moved to the CPU first) uncompressed, in the layout hivemind's
    serializer writes (bfloat16 as its raw 2-byte words).

    Built here rather than by hivemind's serializer: that one sets up compression
    metadata on every call, work that every message of a step pays (with the caches
    cold after the compute) and that an uncompressed tensor does not need.
    """
    requires_grad = tensor.requires_grad
    # Each torch call has a fixed cost, paid cold after a step: only the ones a tensor needs.
    if requires_grad:
        tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if not tensor.is_contiguous():
        tensor = tensor.contiguous()
    raw = tensor.view(torch.int16) if tensor.dtype == torch.bfloat16 else tensor
    return runtime_pb2.Tensor(
        compression=runtime_pb2.CompressionType.NONE,
        buffer=raw.numpy().tobytes(),
        size=tensor.shape,
        dtype=str(tensor.dtype).removeprefix("torch."),
        requires_grad=requires_grad,
    )


def unpack_tensor(
    proto: runtime_pb2.Tensor, *, max_numel: int, name: str = "tensor"
) -> torch.Tensor:
    """Deserializes a wire tensor of an accepted dtype (see `pack_tensor`).

    Raises:
        BadRequestError: compressed, another dtype, more than max_numel elements, or a
            buffer whose length does not match the declared shape.
    """
    _check_encoding(proto, name)
    shape = list(proto.size)
    numel = math.prod(shape)  # sizes are unsigned on the wire
    if numel > max_numel:
        raise BadRequestError(f"{name}: shape {shape} is not one of at most {max_numel} elements")
    return _decode(proto, numel, name)


def unpack_hidden(
    proto: runtime_pb2.Tensor, *, hidden_size: int, max_positions: int, name: str = "hidden"
) -> torch.Tensor:
    """Checks a wire tensor's header, then deserializes it as hidden states [B, S, H].

    The header (dtype, rank, sizes, buffer length) is checked before any bytes are
    touched, so a lying header cannot make us allocate or reshape anything large.

    Raises:
        BadRequestError: wrong dtype, rank, hidden size or compression; more than
            max_positions rows (B * S); or a buffer whose length does not match the declared shape.
    """
    _check_encoding(proto, name)
    shape = list(proto.size)
    if len(shape) != 3:
        raise BadRequestError(f"{name}: expected shape [B, S, H], got {shape}")
    if shape[2] != hidden_size:
        raise BadRequestError(f"{name}: hidden size {shape[2]} != the model's {hidden_size}")
    if min(shape) < 1:
        raise BadRequestError(f"{name}: empty tensor of shape {shape}")
    positions = shape[0] * shape[1]
    if positions > max_positions:
        raise BadRequestError(
            f"{name}: B * S = {positions} positions exceed the limit of {max_positions}"
        )
    return _decode(proto, math.prod(shape), name)


def _check_encoding(proto: runtime_pb2.Tensor, name: str) -> None:
    if proto.compression != runtime_pb2.CompressionType.NONE:
        raise BadRequestError(f"{name}: only uncompressed tensors are accepted")
    if proto.dtype not in _WIRE_DTYPES:
        allowed = ", ".join(sorted(_WIRE_DTYPES))
        raise BadRequestError(f"{name}: dtype {proto.dtype!r} not accepted (use one of {allowed})")


def _decode(proto: runtime_pb2.Tensor, numel: int, name: str) -> torch.Tensor:
    """The tensor of a checked header (`_check_encoding`), once its buffer fits the shape."""
    dtype = _WIRE_DTYPES[proto.dtype]
    wire_dtype = dtype
    # hivemind's legacy mode sends bfloat16 as float32 bytes; both layouts are valid.
    if dtype == torch.bfloat16 and len(proto.buffer) == numel * 4 != numel * 2:
        wire_dtype = torch.float32
    if len(proto.buffer) != numel * wire_dtype.itemsize:
        needs = numel * dtype.itemsize
        raise BadRequestError(
            f"{name}: buffer holds {len(proto.buffer)} bytes, its shape needs {needs}"
        )
    shape = tuple(proto.size)
    if numel == 0:
        return torch.empty(shape, dtype=dtype)
    # A copy the tensor owns (and may write to): the message's bytes are immutable.
    tensor = torch.frombuffer(bytearray(proto.buffer), dtype=wire_dtype).view(shape)
    if wire_dtype != dtype:
        tensor = tensor.to(dtype)
    return tensor.requires_grad_() if proto.requires_grad else tensor
