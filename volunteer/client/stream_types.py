"""What an inference session needs of a stream to a server, and of its caller; and
what a client needs of its own process's block server (`OwnBlocks`).

`volunteer.client.inference` drives streams of this shape; `RemoteSpan`'s streams, the
local links' and the timed and checked wrappers around them all are.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Protocol

import torch

from volunteer.models.adapters import SpanAdapter
from volunteer.scheduler.routing import RouteHop
from volunteer.transport.protocol import NextHop


class InferenceStreamLike(Protocol):
    pushed: bool
    """Whether the server pushed its last step's output on to the next hop."""
    max_chunk: int | None
    """The most positions one step may carry (None: the server did not say)."""

    @property
    def push_target(self) -> NextHop | None:
        """How a previous server names this session to push to it (None: it cannot)."""

    async def step(
        self,
        hidden: torch.Tensor,
        start_pos: int,
        *,
        timeout_s: float,
        step_id: int = 0,
        push_to: list[NextHop] | None = None,
        await_push_s: float = 0.0,
    ) -> torch.Tensor: ...

    async def close(self) -> None: ...


OpenStream = Callable[[RouteHop, int], Awaitable[InferenceStreamLike]]
"""Opens an inference stream on the hop's server for the hop's blocks, whose first
numbered step is the given step id (servers take pushes only for a session's next step)."""
PlanRoute = Callable[[int, int, frozenset[str]], list[RouteHop]]
"""Chooses hops covering [start, end) while avoiding the given peers."""


class OwnBlocks(Protocol):
    """This process's own block server (`volunteer.server.handler.BlockHandler`), called
    in-process: libp2p cannot dial its own peer id."""

    async def run_forward(
        self, hidden: torch.Tensor, start: int, end: int, adapter: SpanAdapter | None = None
    ) -> torch.Tensor: ...

    async def run_backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        adapter: SpanAdapter | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]: ...

    async def open_local_stream(
        self, *, start: int, end: int, max_length: int, batch_size: int
    ) -> InferenceStreamLike: ...
