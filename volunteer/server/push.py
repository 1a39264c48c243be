"""Servers pushing a step's output straight to the next server of the route.

Without pushes, every hop's output goes back to the client, which sends it on to the next
server: per hop and token, that relay is more Python work and two more trips through the
p2p daemons, with cold caches after the step's compute. So a step message may name the
rest of the route (`StepRequest.push_to`): the server sends its output to the next
server over a link it keeps to that peer, then answers its client as before. The client
still sends every hop its input once it has it, so a lost push only costs time; each
server runs whichever copy of a step comes first and drops the other (steps are
numbered by the client).

- `PushLinks`: the sending side, one stream per next peer, opened in the background on
  first need (that step goes the slow way) and reused by every session; on the peer's
  Unix socket when the client saw one on this machine (`volunteer.transport.local_link`).
- `serve_push_stream`: the receiving side of a link: each message is checked and put in
  the inbox of the session it names.
- `StepInbox`: the receiving side of one session: its client's messages and the steps
  pushed to it, in order of arrival.

A push names its session by id and carries the session's push secret: a random value the
client drew for that session (`OpenSessionRequest.push_secret`) and handed only to the
servers before it on the route (`NextHop.push_secret`), so no stranger and no server of
another route can write into a session. A server earlier on the same route learns the
secrets of the hops after it (it forwards them): it can already feed those hops whatever
it likes through its own output, so that grants it nothing new. A push is taken only for
the session's next step (`Session.last_step_id` + 1): one with a later id would make the
session drop the client's own steps as copies. A push that does not fit its session is
dropped, never answered, and ends its link: a server of the route never sends one (but
for a step that lost the race to its client's copy, or a session that closed a moment
before, which are dropped quietly). Each such failure is a strike against the sending
peer, and a peer with a few is refused push links for a growing while
(`volunteer.server.penalty_box`): guessing costs the guesser a new stream per guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import torch
from google.protobuf.message import DecodeError
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.server.caps import max_step_bytes
from volunteer.transport.local_link import open_preferring_local
from volunteer.transport.p2p_streams import open_stream
from volunteer.transport.protocol import (
    BadRequestError,
    PeerUnavailableError,
    SessionExpiredError,
)
from volunteer.transport.queue_wait import get_within
from volunteer.transport.upload_limit import UploadLimit

if TYPE_CHECKING:  # the handler serves these links: a run-time import would be circular
    from volunteer.server.handler import BlockHandler

logger = logging.getLogger(__name__)

OPEN_TIMEOUT_S = 5.0
RETRY_AFTER_S = 30.0
"""A peer whose link failed to open is not tried again for this long."""
MAX_LINKS = 16
"""Links kept (and being opened) at once: a client cannot make a server dial without bound."""
MAX_BUFFERED_BYTES = 1 << 20
"""A link whose peer does not read this much is dropped rather than buffered further."""
INBOX_SIZE = 8
REFUSAL_DROP_BYTES = 1 << 16
"""What a refused push link's peer may still write before we cut it off (see `refuse`):
enough for the end of its message, not for a flood to go on at our expense."""


@dataclasses.dataclass
class _Link:
    writer: asyncio.StreamWriter
    watcher: asyncio.Task[None]
    is_p2p: bool
    """Through p2p (an upload), not a local link."""


class PushLinks:
    """Outgoing push streams of one server, one per peer."""

    def __init__(
        self, p2p: P2P, handle: str, *, own_peer_id: str, upload: UploadLimit | None = None
    ) -> None:
        self._p2p = p2p
        self._upload = upload
        self._handle = handle
        self._own_peer_id = own_peer_id
        self._links: dict[str, _Link] = {}
        self._opening: dict[str, asyncio.Task[None]] = {}
        self._failed_at: dict[str, float] = {}

    def send(self, target: wire.NextHop, message: runtime_pb2.ExpertRequest) -> bool:
        """Writes `message` to the target peer's link without waiting; False when no link
        is open yet (one is then opened in the background) or it broke."""
        peer_id = target.peer_id
        link = self._links.get(peer_id)
        if link is None:
            self._start_opening(peer_id, target.local_socket)
            return False
        transport = link.writer.transport
        if link.writer.is_closing() or transport.get_write_buffer_size() > MAX_BUFFERED_BYTES:
            self._drop(peer_id)
            return False
        frame = framing.encode_frame(message)
        if link.is_p2p and self._upload is not None:
            # Charged, not waited for (a push never holds up its step): the replies
            # that follow wait for it.
            self._upload.charge(len(frame))
        link.writer.write(frame)
        return True

    async def close(self) -> None:
        """Closes every link and cancels the openings in flight."""
        tasks = list(self._opening.values())
        for task in tasks:
            task.cancel()
        for peer_id in list(self._links):
            tasks.append(self._links[peer_id].watcher)
            self._drop(peer_id)
        await asyncio.gather(*tasks, return_exceptions=True)

    def _start_opening(self, peer_id: str, local_socket: str | None) -> None:
        if peer_id in self._opening or peer_id == self._own_peer_id:
            return
        if len(self._links) + len(self._opening) >= MAX_LINKS:
            return
        failed_at = self._failed_at.get(peer_id)
        if failed_at is not None and time.monotonic() - failed_at < RETRY_AFTER_S:
            return
        try:
            peer = PeerID.from_base58(peer_id)
        except ValueError:
            self._failed(peer_id)
            return
        opening = self._open(peer_id, peer, local_socket)
        task = asyncio.create_task(opening, name=f"push-link-{peer_id[-8:]}")
        self._opening[peer_id] = task
        task.add_done_callback(lambda _: self._opening.pop(peer_id, None))

    async def _open(self, peer_id: str, peer: PeerID, local_socket: str | None) -> None:
        try:
            reader, writer, is_p2p = await self._connect(peer_id, peer, local_socket)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # any failure only means this peer gets no pushes for now
            logger.info("no push link to %s: %s: %s", peer_id, type(exc).__name__, exc)
            self._failed(peer_id)
            return
        watcher = asyncio.create_task(self._watch(peer_id, reader), name="push-link-watch")
        self._links[peer_id] = _Link(writer, watcher, is_p2p)

    async def _connect(
        self, peer_id: str, peer: PeerID, local_socket: str | None
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """A link on the peer's local socket where the client named one, else through
        p2p; and whether it went through p2p."""
        via_p2p = False

        async def through_p2p() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            nonlocal via_p2p
            via_p2p = True
            connecting = open_stream(self._p2p, peer, self._handle)
            _, reader, writer = await asyncio.wait_for(connecting, OPEN_TIMEOUT_S)
            return reader, writer

        opened = await open_preferring_local(local_socket, peer_id, self._handle, through_p2p)
        return *opened, via_p2p

    async def _watch(self, peer_id: str, reader: asyncio.StreamReader) -> None:
        """Drops the link when its peer ends it (the peer never writes on it)."""
        with contextlib.suppress(Exception):
            await reader.read(1)
        self._drop(peer_id)

    def _failed(self, peer_id: str) -> None:
        now = time.monotonic()
        # Forget failures old enough to retry: clients may name any number of peers.
        expired = [peer for peer, at in self._failed_at.items() if now - at >= RETRY_AFTER_S]
        for peer in expired:
            del self._failed_at[peer]
        self._failed_at[peer_id] = now

    def _drop(self, peer_id: str) -> None:
        link = self._links.pop(peer_id, None)
        if link is not None:
            link.watcher.cancel()
            link.writer.close()


@dataclasses.dataclass(frozen=True)
class PushedStep:
    """A step pushed by another server, already parsed and checked as hidden states."""

    meta: wire.StepRequest
    hidden: torch.Tensor


Inbound = runtime_pb2.ExpertRequest | PushedStep


class StepInbox:
    """One session's messages: its client's stream and the steps pushed to it.

    Owns the task that reads the client's stream; `close` cancels it.
    """

    def __init__(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        *,
        idle_timeout_s: float,
        push_secret: str | None = None,
    ) -> None:
        """
        Args:
            push_secret: what a push must carry to be taken (None: no push is).
        """
        self.idle_timeout_s = idle_timeout_s
        self._push_secret = push_secret
        self._queue: asyncio.Queue[Inbound | BaseException | None] = asyncio.Queue(INBOX_SIZE)
        self._reading = asyncio.create_task(self._read(requests), name="inference-inbox")

    def admits(self, secret: str | None) -> bool:
        """Whether a push carrying `secret` may write into this session."""
        if self._push_secret is None or secret is None:
            return False
        # Constant time: a push's answer is silence either way, but its timing is not.
        return hmac.compare_digest(self._push_secret, secret)

    def push(self, step: PushedStep) -> bool:
        """Queues a pushed step; False when the inbox is full (the client's copy will do)."""
        try:
            self._queue.put_nowait(step)
        except asyncio.QueueFull:
            return False
        return True

    async def next(self) -> Inbound | None:
        """The next message (None at the end of the client's stream).

        Raises:
            SessionExpiredError: nothing came for `idle_timeout_s`.
            Whatever reading the client's stream raised.
        """
        try:
            item = await get_within(self._queue, self.idle_timeout_s)
        except asyncio.TimeoutError:
            raise SessionExpiredError(
                f"no message for {self.idle_timeout_s:g} s; stream closed"
            ) from None
        if isinstance(item, BaseException):
            raise item
        return item

    async def next_from_client(self) -> runtime_pb2.ExpertRequest | None:
        """The client's next message, skipping pushed steps (after a close)."""
        while isinstance(item := await self.next(), PushedStep):
            pass
        return item

    def close(self) -> None:
        self._reading.cancel()

    async def _read(self, requests: AsyncIterator[runtime_pb2.ExpertRequest]) -> None:
        try:
            async for request in requests:
                await self._queue.put(request)  # a full inbox holds the client back
            await self._queue.put(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the session's loop, which ends on it
            await self._queue.put(exc)


async def serve_push_stream(
    handler: BlockHandler, peer: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    """A link from another server: each message is a step for one of our sessions.

    Nothing is ever answered: a push that lands in a session, or arrives late for one, is
    all a link carries. A push that fails (see `_take_push`) strikes its peer and ends
    the link with a "bad request:" error, as does a link whose first push does not come
    within the caps' first-message bound; one that breaks the framing, or stays silent
    past the idle timeout, is closed.
    """
    max_bytes = max_step_bytes(handler)
    timeout_s = handler.caps.first_message_within(max_bytes)
    is_first = True
    with contextlib.closing(writer):
        while True:
            try:
                reading = framing.read_frame(reader, max_bytes=max_bytes)
                marker, body = await asyncio.wait_for(reading, timeout_s)
            except asyncio.TimeoutError:
                if is_first:
                    why = f"no push within {timeout_s:g} s of opening the link"
                    await handler.refusals.refuse(
                        reader, writer, BadRequestError(why), drop_bytes=REFUSAL_DROP_BYTES
                    )
                return  # else silent too long
            except (asyncio.IncompleteReadError, PeerUnavailableError, OSError):
                return  # ended, not our framing, or the connection broke
            if marker != P2P.MESSAGE_MARKER:
                return
            is_first, timeout_s = False, handler.limits.idle_timeout_s
            try:
                _take_push(handler, body)
            except BadRequestError as exc:
                ban_s = handler.push_penalties.strike(peer)
                logger.debug("refused a push from %s (ban %g s): %s", peer, ban_s, exc)
                # The same reason for every failure: a guess learns nothing.
                refusal = BadRequestError("a push was refused; link closed")
                await handler.refusals.refuse(
                    reader, writer, refusal, drop_bytes=REFUSAL_DROP_BYTES
                )
                return


def _take_push(handler: BlockHandler, body: bytes) -> None:
    """Puts a pushed step in its session's inbox, or drops a late one quietly.

    The tensor is read only once the push is known to be the session's own.

    Raises:
        BadRequestError: the push is malformed, names no open session it may write
            into, or does not fit the session.
    """
    request = runtime_pb2.ExpertRequest()
    try:
        request.ParseFromString(body)
    except DecodeError as exc:
        raise BadRequestError(f"not a protobuf message ({exc})") from exc
    meta = wire.unpack_metadata(request.metadata, wire.StepRequest)
    if meta.is_close or meta.step_id == 0:
        raise BadRequestError("a push carries a numbered step")
    session = handler.sessions.find_for_push(meta.session_id)
    if session is None or session.inbox is None or not session.inbox.admits(meta.push_secret):
        if handler.sessions.closed_lately(meta.session_id, meta.push_secret):
            return  # the session closed as its route's previous server pushed
        # One answer for both: a wrong secret must not tell that the session exists.
        raise BadRequestError(f"no session {meta.session_id!r} takes this push")
    if meta.step_id <= session.last_step_id:
        return  # late: the client's copy was run already
    if meta.step_id != session.last_step_id + 1:
        raise BadRequestError(
            f"step {meta.step_id} is not the session's next ({session.last_step_id + 1})"
        )
    (hidden,) = handler.hidden_tensors(request, count=1)
    if not session.inbox.push(PushedStep(meta, hidden)):
        logger.debug("dropped a push: session %r has a full inbox", meta.session_id)
