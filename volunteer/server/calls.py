"""forward/backward calls, served as plain streams in hivemind's framing.

hivemind's stream RPC handler reads each message with `readexactly(n)` of the length
the peer wrote (up to 2**64 - 1), and prefetches up to five such messages per stream
before the handler sees one: any peer could make the server allocate without bound.
These calls come through our own reader instead (`client_messages`), which refuses a
length over the bound before reading its body; the handle names, framing and error
frames stay hivemind's, so hivemind's stubs and our client call them unchanged. Each
call holds one of the server's `max_queued_jobs` slots, and of its peer's share
`max_calls_per_peer`, from its first byte to its reply; its request must come within
`ServerCaps.first_message_within` of opening.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo
from hivemind.proto import runtime_pb2

from volunteer.server.caps import serve_in_slot
from volunteer.server.inference_stream import client_messages, write_replies
from volunteer.server.validation import opened_within

if TYPE_CHECKING:  # the handler serves these calls: a run-time import would be circular
    from volunteer.server.handler import BlockHandler


async def serve_call(
    handler: BlockHandler,
    stream_info: StreamInfo,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    is_backward: bool,
) -> None:
    """One forward (or backward) call: its one message in, one reply out."""
    peer = str(stream_info.peer_id)
    caps, hidden_size = handler.caps, handler.span.config.hidden_size
    if is_backward:
        positions = min(caps.max_backward_tokens, handler.limits.max_tokens)
        tensors, answer = 2, handler.rpc_backward
    else:
        positions, tensors, answer = handler.limits.max_tokens, 1, handler.rpc_forward
    shape = {"hidden_size": hidden_size, "tensors": tensors, "positions": positions}
    max_bytes = caps.message_bytes(**shape, adapter=True)
    # The slow-uplink allowance follows the hidden states alone: a fine-tuning client's
    # adapter does not buy a silent stream a longer hold on its slot.
    within = caps.first_message_within(caps.message_bytes(**shape))

    async def replies() -> AsyncIterator[runtime_pb2.ExpertResponse]:
        messages = client_messages(reader, max_bytes=max_bytes)
        yield await answer(opened_within(messages, timeout_s=within), peer=peer)

    async def serve() -> None:
        await write_replies(
            replies(),
            reader,
            writer,
            peer=peer,
            timeout_s=handler.limits.idle_timeout_s,
            refusals=handler.refusals,
            upload=handler.upload,  # these calls come through p2p only
        )

    await serve_in_slot(handler.call_slots, handler.refusals, peer, reader, writer, serve)
