"""An inference session on this process's own block server.

libp2p refuses to dial its own peer id, so when a daemon's client routes through the
blocks that the same daemon serves, the steps go straight to its `BlockHandler`: the same
checks, the same cache budget and the same compute queue as a remote session, no network.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import TYPE_CHECKING

import torch

import volunteer.transport.protocol as wire
from volunteer.server.sessions import Session
from volunteer.transport.protocol import RemoteSpanError

if TYPE_CHECKING:  # the handler opens these streams: a run-time import would be circular
    from volunteer.server.handler import BlockHandler

LOCAL_PEER = "local"
"""The `peer` that in-process sessions are admitted under (never a real peer id)."""


class LocalInferenceStream:
    """Blocks [start, end) of this process's handler, with the `InferenceStream` interface."""

    def __init__(self, handler: BlockHandler, session: Session) -> None:
        self.handler = handler
        self.session = session
        self._lock = asyncio.Lock()
        self._is_closed = False

    @classmethod
    async def open(
        cls,
        handler: BlockHandler,
        *,
        start: int,
        end: int,
        max_length: int,
        batch_size: int,
        session_id: str | None = None,
    ) -> LocalInferenceStream:
        """Admits a session on `handler`.

        Raises:
            BusyError: no cache room now, or the server holds its most sessions.
            BadRequestError: the span or a limit is wrong.
        """
        meta = wire.OpenSessionRequest(
            start=start,
            end=end,
            session_id=session_id or uuid.uuid4().hex,
            max_length=max_length,
            batch_size=batch_size,
        )
        # Counted as a stream's session is, so that the caps hold for every session.
        handler.session_slots.take(LOCAL_PEER)
        try:
            return cls(handler, await handler.open_session(meta, peer=LOCAL_PEER))
        except BaseException:
            handler.session_slots.give_back(LOCAL_PEER)
            raise

    push_target = None
    """No other server can push to an in-process session."""
    pushed = False
    """Nor does it push: its output comes back to this process at no cost."""

    @property
    def max_chunk(self) -> int:
        """The most positions one step of this session may carry."""
        limits = self.handler.limits
        return max(1, min(limits.max_chunk, limits.max_tokens // self.session.batch_size))

    async def step(
        self,
        hidden: torch.Tensor,
        start_pos: int,
        *,
        timeout_s: float,
        step_id: int = 0,
        push_to: list[wire.NextHop] | None = None,
        await_push_s: float = 0.0,
    ) -> torch.Tensor:
        """Runs hidden [B, S, H] at positions [start_pos, start_pos + S) through the blocks.

        `step_id`, `push_to` and `await_push_s` are ignored: this process's own server is called
        directly, and its output comes back here at no cost.
        """
        async with self._lock:
            if self._is_closed:
                raise RemoteSpanError("the local inference session is closed")
            try:
                self.handler.check_hidden(hidden)
                return await asyncio.wait_for(
                    self.handler.run_step(self.session, hidden, start_pos), timeout_s
                )
            except BaseException:
                # As for a remote stream: a failed step ends the session.
                self._release()
                raise

    async def close(self, timeout_s: float = 5.0) -> None:
        """Frees the session's cache (idempotent)."""
        self._release()

    def _release(self) -> None:
        if not self._is_closed:
            self.handler.session_slots.give_back(LOCAL_PEER)
        self._is_closed = True
        self.handler.end_session(self.session)
