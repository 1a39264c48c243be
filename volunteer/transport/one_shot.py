"""One request, one answer over a p2p stream: the exchanges that need no session.

Both sides read within a byte bound and a deadline; a hostile peer can waste one bounded
exchange, nothing more. Credit receipts and proofs (`volunteer.trust.credit_exchange`)
and the training peers' calls (`volunteer.training.calls`) travel this way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from hivemind.p2p import P2P, PeerID
from hivemind.p2p.p2p_daemon_bindings.datastructures import StreamInfo

from volunteer.errors import VolunteerError
from volunteer.transport import framing
from volunteer.transport.p2p_streams import open_stream

REQUEST_TIMEOUT_S = 10.0
"""How long a served stream waits for its request and for the asker to take the answer."""

logger = logging.getLogger(__name__)

Answer = Callable[[str, bytes], Awaitable[bytes]]
"""A handle's answer to a request from a peer (its peer id and the request's body)."""


class ExchangeError(VolunteerError):
    """The peer did not answer in time, within bounds, or in the expected form."""


def serve(answer: Answer, *, max_request_bytes: int, max_serving: int = 16) -> Callable:
    """A stream handler that reads one frame, answers it with `answer` and closes;
    beyond `max_serving` at once, requests are closed unanswered. The answer bounds
    its own time: some wait on purpose (a training step's gather)."""
    serving = asyncio.Semaphore(max_serving)

    async def handler(
        info: StreamInfo, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.closing(writer):
            if serving.locked():
                return
            async with serving:
                try:
                    _, body = await asyncio.wait_for(
                        framing.read_frame(reader, max_bytes=max_request_bytes), REQUEST_TIMEOUT_S
                    )
                    reply = await answer(info.peer_id.to_base58(), body)
                    writer.write(framing.frame_bytes(reply))
                    await asyncio.wait_for(writer.drain(), REQUEST_TIMEOUT_S)
                    # The asker closes once it has read the answer; closing first has
                    # been seen to cut an answer's tail short under load.
                    await asyncio.wait_for(reader.read(1), REQUEST_TIMEOUT_S)
                except Exception as exc:  # a peer that went away or sent junk
                    logger.debug("a one-shot request failed: %s", exc)

    return handler


async def ask(
    p2p: P2P, peer_id: str, handle: str, body: bytes, *, max_answer_bytes: int, timeout_s: float
) -> bytes:
    """The peer's answer to one request.

    Raises:
        ExchangeError: unreachable, too slow, or an answer over the bound.
    """

    async def exchange() -> bytes:
        _, reader, writer = await open_stream(p2p, PeerID.from_base58(peer_id), handle)
        with contextlib.closing(writer):
            writer.write(framing.frame_bytes(body))
            await writer.drain()
            _, answer = await framing.read_frame(reader, max_bytes=max_answer_bytes)
            return answer

    try:
        return await asyncio.wait_for(exchange(), timeout_s)
    except Exception as exc:  # the daemon's, the stream's and the wait's many errors
        raise ExchangeError(f"{peer_id} did not answer on {handle}: {exc!r}") from None
