"""How much of a block server any one stranger, and all of them together, may hold.

Each cap is a setting (`volunteer.settings.fields`, where each one's memory bound is
stated); `ServerCaps` carries their values to the handler. Streams are counted from
their first byte, not from a successful open: a stream that never sends its first
message holds a file descriptor and a read buffer all the same. A stream over a cap is
answered "busy:" (room may come later), unread (see `Refusals` for when it is closed).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.settings import Settings
from volunteer.transport.protocol import BusyError

if TYPE_CHECKING:  # the handler holds the caps: a run-time import would be circular
    from volunteer.server.handler import BlockHandler

REFUSAL_LINGER_S = 30.0
"""How long a refused stream waits for its peer to take the reason and end its side."""
ERROR_WRITE_TIMEOUT_S = 1.0
"""How long a stream past its linger budget waits to hand its peer the reason."""
MAX_LINGERING = 1024
"""Refused streams waiting at once for their peers (each an idle socket and a task)."""
MAX_HELD_UNREAD = 32
"""Streams of peers kept out for misbehaving, held open unread at once (see
`Refusals.hold_unread`); each may leave a flow-control window of bytes in p2pd."""
MIB = 1 << 20


@dataclasses.dataclass(frozen=True)
class BatchCaps:
    """How much one batch may hold (`volunteer.server.step_batch`; 1 session: no batching)."""

    max_sessions: int
    max_bytes: int
    prefill_chunk: int
    """Positions of a prefill per batch (0: a prefill runs whole)."""


@dataclasses.dataclass(frozen=True)
class ServerCaps:
    """The caps of one block server (see each setting's docstring)."""

    max_message_bytes: int
    max_sessions: int
    max_sessions_per_peer: int
    max_queued_jobs: int
    max_calls_per_peer: int
    max_backward_tokens: int
    max_adapter_bytes: int
    max_session_s: float
    max_push_streams_per_peer: int
    forward_slice_s: float
    first_message_s: float
    batch: BatchCaps

    @classmethod
    def from_settings(cls, settings: Settings) -> ServerCaps:
        return cls(
            max_message_bytes=settings.max_message_mib * MIB,
            max_sessions=settings.max_sessions,
            max_sessions_per_peer=settings.max_sessions_per_peer,
            max_queued_jobs=settings.max_queued_jobs,
            max_calls_per_peer=settings.max_calls_per_peer,
            max_backward_tokens=settings.max_backward_tokens,
            max_adapter_bytes=settings.max_adapter_mib * MIB,
            max_session_s=settings.max_session_s,
            max_push_streams_per_peer=settings.max_push_streams_per_peer,
            forward_slice_s=settings.forward_slice_s,
            first_message_s=settings.first_message_s,
            batch=BatchCaps(
                max_sessions=settings.batch_max_sessions,
                max_bytes=settings.batch_max_mib * MIB,
                prefill_chunk=settings.prefill_chunk_tokens,
            ),
        )

    def message_bytes(
        self, *, hidden_size: int, tensors: int, positions: int, adapter: bool = False
    ) -> int:
        """The largest message a valid request can be (`tensors` float32 hidden states
        of `positions` rows, an adapter if it may carry one, and the metadata), within
        `max_message_bytes`."""
        valid = tensors * positions * hidden_size * 4 + wire.MAX_METADATA_BYTES
        if adapter:
            valid += self.max_adapter_bytes
        return min(valid, self.max_message_bytes)

    def first_message_within(self, max_bytes: int) -> float:
        """How long a stream may take to send its first message of up to `max_bytes`:
        `first_message_s`, and a second per MiB for a slow uplink."""
        return self.first_message_s + max_bytes / MIB


def max_step_bytes(handler: BlockHandler) -> int:
    """The largest message a valid step can be, sent by a client or pushed by another
    server (a float32 tensor of max_tokens positions and its metadata), within the
    server's message cap."""
    return handler.caps.message_bytes(
        hidden_size=handler.span.config.hidden_size, tensors=1, positions=handler.limits.max_tokens
    )


DEFAULT_CAPS = ServerCaps.from_settings(Settings())
"""The settings' defaults: one declaration each, read from there."""


class PeerSlots:
    """Slots of one kind (sessions, calls, push streams), in total and per peer.

    Used from the event loop only: taking checks and counts without awaiting between.
    """

    def __init__(self, what: str, *, total: int, per_peer: int | None = None) -> None:
        self.what = what
        self.total = total
        self.per_peer = per_peer
        self._held: collections.Counter[str] = collections.Counter()

    @property
    def used(self) -> int:
        return sum(self._held.values())

    def held_by(self, peer: str) -> int:
        return self._held[peer]

    def take(self, peer: str) -> None:
        """Raises BusyError when the peer's share or the total is used up."""
        if self.per_peer is not None and self._held[peer] >= self.per_peer:
            raise BusyError(f"this peer already holds {self.per_peer} {self.what}, its most")
        if self.used >= self.total:
            raise BusyError(f"server holds {self.total} {self.what}, its most; try another")
        self._held[peer] += 1

    def give_back(self, peer: str) -> None:
        self._held[peer] -= 1
        if self._held[peer] <= 0:
            del self._held[peer]


class Refusals:
    """Ends refused streams, each with an error frame naming the reason, as hivemind's
    handlers do.

    Closing with the peer's bytes unread resets the stream, and a reset can drop our
    answer before the peer reads it: so a refused stream lingers, its peer's bytes read
    and dropped (never kept), until the peer ends its side. An honest peer does so as soon
    as it has read the reason. A peer that holds the stream open instead, to have us
    close it and open the next (a flood of stream opens, each costing us more than it
    costs the peer), finds it held for `linger_s`: it waits, not us. At most
    `max_lingering` refused streams linger at once (bounded sockets and memory); past
    that, a refused stream is closed as soon as its reason is written. Of the peer's
    bytes, at most `max_drop_bytes` per stream are read (one message's worth).

    Used from the event loop only.
    """

    def __init__(
        self,
        *,
        max_drop_bytes: int,
        linger_s: float = REFUSAL_LINGER_S,
        max_lingering: int = MAX_LINGERING,
        max_held_unread: int = MAX_HELD_UNREAD,
    ) -> None:
        self.max_drop_bytes = max_drop_bytes
        self.linger_s = linger_s
        self.max_lingering = max_lingering
        self.max_held_unread = max_held_unread
        self.lingering = 0
        self.held_unread = 0

    async def refuse(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        exc: Exception,
        *,
        drop_bytes: int | None = None,
    ) -> None:
        """Answers `exc` and ends the stream (see the class's docstring); of the peer's
        bytes, at most `drop_bytes` (None: `max_drop_bytes`) are dropped before it is cut
        off: a peer that keeps writing into a refused stream (a flood) gets its next
        writes failed, and has to open another stream."""
        if drop_bytes is None:
            drop_bytes = self.max_drop_bytes
        with contextlib.closing(writer), contextlib.suppress(Exception):
            writer.write(framing.encode_frame(RPCError(message=str(exc))))
            if self.lingering >= self.max_lingering:
                await asyncio.wait_for(writer.drain(), ERROR_WRITE_TIMEOUT_S)
                return
            self.lingering += 1
            try:
                await asyncio.wait_for(_drop_until_end(reader, drop_bytes), self.linger_s)
            finally:
                self.lingering -= 1

    async def hold_unread(self, writer: asyncio.StreamWriter, exc: Exception) -> None:
        """Answers `exc`, then holds the stream open for `linger_s` without reading it:
        for a peer kept out for misbehaving, whose streams carry a flood (pushes written
        without waiting for answers). Once the flow-control windows between us are full
        its writes wait, so its next stream waits too, and its bytes cost us nothing
        more. At most `max_held_unread` at once; past that, the stream is closed once
        the reason is written."""
        with contextlib.closing(writer), contextlib.suppress(Exception):
            writer.write(framing.encode_frame(RPCError(message=str(exc))))
            if self.held_unread >= self.max_held_unread:
                await asyncio.wait_for(writer.drain(), ERROR_WRITE_TIMEOUT_S)
                return
            writer.transport.pause_reading()
            self.held_unread += 1
            try:
                await asyncio.sleep(self.linger_s)
            finally:
                self.held_unread -= 1


async def serve_in_slot(
    slots: PeerSlots,
    refusals: Refusals,
    peer: str,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    serve: Callable[[], Awaitable[None]],
) -> None:
    """Runs `serve` (one stream of `peer`) while it holds a slot; without a free slot,
    answers the stream with the busy error instead (see `Refusals`)."""
    try:
        slots.take(peer)
    except BusyError as exc:
        await refusals.refuse(reader, writer, exc)
        return
    try:
        await serve()
    finally:
        slots.give_back(peer)


async def _drop_until_end(reader: asyncio.StreamReader, limit: int) -> None:
    dropped = 0
    while dropped < limit and (chunk := await reader.read(1 << 16)):
        dropped += len(chunk)
