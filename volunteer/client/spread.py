"""Forward and backward of hidden states through a run of blocks, spread over the swarm.

Training traffic (fine-tuning, spot checks) keeps no cache on the servers: every call
stands alone. So each hop goes to a server drawn at random, weighted by throughput, among
those holding the next block (`volunteer.scheduler.routing.load_spread_route`), which spreads the
load; a hop that fails on a peer or network error is drawn again without that peer.

The forward returns, with its output, the trace of the hops it took and their inputs:
all a backward needs, since a server recomputes its blocks' forward from the inputs.
When a server of the trace is gone by the time of the backward, its blocks are run
forward again elsewhere from the kept inputs, and the backward goes through that new
trace instead. Only peer and network errors are retried; a bad request is raised.

A fine-tuning client's adapter (`volunteer.models.adapters`) for the call's blocks goes
with it, each hop carrying its blocks' part; the backward puts the hops' adapter
gradients back together into the gradients of the whole adapter.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import Awaitable, Callable

import torch

from volunteer.client.inference import SessionFailedError
from volunteer.client.span_calls import Grads
from volunteer.models.adapters import SpanAdapter
from volunteer.scheduler.routing import Backoff, NoRouteError, RouteHop

logger = logging.getLogger(__name__)

RETRY_PAUSE_S = 0.1
"""The pause before trying again a server that just failed (doubling with each failure
of the call)."""
MAX_RETRY_PAUSE_S = 2.0

Forward = Callable[[RouteHop, torch.Tensor, SpanAdapter | None], Awaitable[torch.Tensor]]
"""Runs hidden states through the hop's blocks on the hop's server (with the adapter of
exactly those blocks, if any)."""
Backward = Callable[[RouteHop, torch.Tensor, torch.Tensor, SpanAdapter | None], Awaitable[Grads]]
"""(hop, inputs, grad of outputs, adapter) -> grads of inputs and adapter, on the hop's
server."""
PlanSpread = Callable[[int, int, frozenset[str]], list[RouteHop]]
"""A load-spread route over [start, end) avoiding the given peers."""


@dataclasses.dataclass(frozen=True)
class TracedHop:
    """One hop of a forward: where it ran, and what went in."""

    hop: RouteHop
    inputs: torch.Tensor
    adapter: SpanAdapter | None = None
    """The hop's part of the call's adapter."""


class SpreadCalls:
    """Stateless forward/backward through [start, end), spread and retried.

    Args:
        plan: draws a route (only its first hop is used; the next is drawn after it).
        forward, backward: the calls to one server.
        retriable: the errors that mean "try another server".
        backoff: failed peers are avoided for a while (shared with the client).
        clock: monotonic seconds, for the back-off.
        max_failures: failed hops allowed per call before giving up.
        banned: the peers never to route to (our checks found them wrong).
    """

    def __init__(
        self,
        *,
        plan: PlanSpread,
        forward: Forward,
        backward: Backward,
        retriable: tuple[type[BaseException], ...],
        backoff: Backoff,
        clock: Callable[[], float],
        max_failures: int = 8,
        banned: Callable[[], frozenset[str]] = frozenset,
    ) -> None:
        self._banned = banned
        self._plan = plan
        self._forward = forward
        self._backward = backward
        self._retriable = retriable
        self._backoff = backoff
        self._clock = clock
        self._max_failures = max_failures

    async def forward(
        self, hidden: torch.Tensor, start: int, end: int, adapter: SpanAdapter | None = None
    ) -> tuple[torch.Tensor, list[TracedHop]]:
        """Hidden [B, S, H] through blocks [start, end) (with `adapter`, covering exactly
        those blocks, if any); the output and the trace.

        Raises:
            SessionFailedError: no server left for some block, or too many failures.
            Any non-retriable error of a server (e.g. a bad request), unchanged.
        """
        trace: list[TracedHop] = []
        failures = 0
        position = start
        while position < end:
            hop, is_again = self._next_hop(position, end)
            if is_again:
                await asyncio.sleep(min(RETRY_PAUSE_S * 2**failures, MAX_RETRY_PAUSE_S))
            part = None
            if adapter is not None:
                part = adapter.narrow(hop.start - start, hop.end - hop.start)
            try:
                output = await self._forward(hop, hidden, part)
            except self._retriable as exc:
                failures = self._failed(hop, exc, failures)
                continue
            self._backoff.record_success(hop.peer_id)
            trace.append(TracedHop(hop, hidden, part))
            hidden, position = output, hop.end
        return hidden, trace

    async def backward(self, trace: list[TracedHop], grad_outputs: torch.Tensor) -> Grads:
        """The gradient of the trace's first inputs, given that of its last outputs (and
        those of the whole adapter the forward carried, if any).

        Raises:
            SessionFailedError, or a non-retriable server error, as for `forward`.
        """
        return await self._backward_trace(trace, grad_outputs, failures=0)

    async def _backward_trace(
        self, trace: list[TracedHop], grad_outputs: torch.Tensor, *, failures: int
    ) -> Grads:
        grad = grad_outputs
        parts: list[tuple[TracedHop, tuple[torch.Tensor, ...]]] = []
        for traced in reversed(trace):
            grad, adapter_grads = await self._backward_hop(traced, grad, failures)
            parts.append((traced, adapter_grads))
        return Grads(grad, _joined(parts))

    async def _backward_hop(self, traced: TracedHop, grad: torch.Tensor, failures: int) -> Grads:
        hop = traced.hop
        try:
            result = await self._backward(hop, traced.inputs, grad, traced.adapter)
        except self._retriable as exc:
            failures = self._failed(hop, exc, failures)
            # Its blocks again, on servers that are still there, then back through them.
            _, retrace = await self.forward(traced.inputs, hop.start, hop.end, traced.adapter)
            return await self._backward_trace(retrace, grad, failures=failures)
        self._backoff.record_success(hop.peer_id)
        return result

    def _next_hop(self, position: int, end: int) -> tuple[RouteHop, bool]:
        """The next hop, and whether it goes to a server that failed a moment ago: when
        every server left for the blocks did, a glitch (a reply cut short, a busy moment)
        is likelier than a death, so they are tried again, after a pause, within the
        call's failures allowed."""
        banned = self._banned()
        avoid = self._backoff.avoided(self._clock()) | banned
        try:
            return self._plan(position, end, avoid)[0], False
        except NoRouteError as exc:
            with contextlib.suppress(NoRouteError):
                if avoid != banned:
                    return self._plan(position, end, banned)[0], True
            raise SessionFailedError(
                f"no servers left for blocks {position}:{end} "
                f"(avoiding {len(avoid)} failed or banned peer(s)): {exc}"
            ) from exc

    def _failed(self, hop: RouteHop, error: BaseException, failures: int) -> int:
        logger.warning("peer %s failed on blocks %d:%d: %s", hop.peer_id, hop.start, hop.end, error)
        self._backoff.record_failure(hop.peer_id, self._clock())
        if failures + 1 > self._max_failures:
            raise SessionFailedError(f"{failures + 1} server failures in one call; giving up")
        return failures + 1


def _joined(parts: list[tuple[TracedHop, tuple[torch.Tensor, ...]]]) -> tuple[torch.Tensor, ...]:
    """The hops' adapter gradients (the hops of one trace: contiguous blocks), stacked
    over the blocks of the whole trace."""
    if not parts or not parts[0][1]:
        return ()
    ordered = [grads for _, grads in sorted(parts, key=lambda part: part[0].hop.start)]
    return tuple(torch.cat(column, dim=0) for column in zip(*ordered, strict=True))
