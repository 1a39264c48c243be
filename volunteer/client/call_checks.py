"""Checking servers' forward and backward calls, the passes fine-tuning runs (issue 15).

A call stands alone (no cache), so a check is simply the same call computed again: on
blocks this process computes itself when it can (`LocalBlocks`, the arbiter: a
mismatch convicts the server), else on another server holding exactly those blocks,
whose disagreement only sets the output aside (nobody is banned without an arbiter).
Which calls are checked follows the same policy as inference steps
(`Verifier.wants_check`: every call of a newcomer, fewer as its record grows).

A wrong server is banned and its call raises `WrongOutputError`, which the spread
(`volunteer.client.spread`) retries on another server, checked in turn: the caller
gets an honest result. Forward/backward replies carry no signed commitment yet, so a
ban here stays this peer's own (no accusation).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import torch

from volunteer.client.span_calls import Grads
from volunteer.client.spread import Backward, Forward
from volunteer.client.verification import Verifier, WrongOutputError
from volunteer.models.adapters import SpanAdapter
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import NoRouteError, RouteHop
from volunteer.trust.tolerance import first_mismatch

logger = logging.getLogger(__name__)

LocalSpan = Callable[[int, int], Awaitable[BlockSpan | None]]
"""Blocks [start, end) computed in this process (None: it cannot)."""
Result = TypeVar("Result")
PlanOther = Callable[[int, int, frozenset[str]], list[RouteHop]]


class CheckedCalls:
    """A `Forward` and a `Backward` that check a share of calls (see the module)."""

    def __init__(
        self,
        verifier: Verifier,
        forward: Forward,
        backward: Backward,
        *,
        local_span: LocalSpan | None,
        plan: PlanOther,
    ) -> None:
        self.verifier = verifier
        self._forward = forward
        self._backward = backward
        self._local_span = local_span
        self._plan = plan

    async def forward(
        self, hop: RouteHop, hidden: torch.Tensor, adapter: SpanAdapter | None
    ) -> torch.Tensor:
        output = await self._forward(hop, hidden, adapter)
        if not self.verifier.wants_check(hop.peer_id):
            return output
        span = await self._span(hop)
        if span is not None:
            expected = await asyncio.to_thread(_local_forward, span, hidden, adapter)
        else:
            expected = await self._elsewhere(
                hop, lambda other: self._forward(other, hidden, adapter)
            )
        return self._judge(hop, "forward", output, expected, is_arbiter=span is not None)

    async def backward(
        self,
        hop: RouteHop,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        adapter: SpanAdapter | None,
    ) -> Grads:
        grads = await self._backward(hop, hidden, grad_outputs, adapter)
        if not self.verifier.wants_check(hop.peer_id):
            return grads
        span = await self._span(hop)
        if span is not None:
            expected = await asyncio.to_thread(_local_backward, span, hidden, grad_outputs, adapter)
        else:

            async def other_backward(other: RouteHop) -> Grads:
                return await self._backward(other, hidden, grad_outputs, adapter)

            expected = await self._elsewhere(hop, other_backward)
        # Each block's adapter gradients count as one more position of the comparison.
        self._judge(
            hop,
            "backward",
            _comparable(grads),
            None if expected is None else _comparable(expected),
            is_arbiter=span is not None,
        )
        return grads

    async def _span(self, hop: RouteHop) -> BlockSpan | None:
        if self._local_span is None:
            return None
        try:
            return await self._local_span(hop.start, hop.end)
        except Exception as exc:  # e.g. the model's files could not be read
            logger.warning("cannot compute blocks %d:%d here: %s", hop.start, hop.end, exc)
            return None

    async def _elsewhere(
        self, hop: RouteHop, call: Callable[[RouteHop], Awaitable[Result]]
    ) -> Result | None:
        """The call on another server of exactly these blocks (None: none, or it failed)."""
        avoid = frozenset({hop.peer_id}) | self.verifier.banned()
        try:
            other = self._plan(hop.start, hop.end, avoid)[0]
        except NoRouteError:
            return None
        if (other.start, other.end) != (hop.start, hop.end):
            return None
        try:
            return await call(other)
        except Exception as exc:  # the other server's failure is not this call's
            logger.info("the check of %s on %s failed: %s", hop.peer_id, other.peer_id, exc)
            return None

    def _judge(
        self,
        hop: RouteHop,
        kind: str,
        output: torch.Tensor,
        expected: torch.Tensor | None,
        *,
        is_arbiter: bool,
    ) -> torch.Tensor:
        verifier = self.verifier
        if expected is None:
            verifier.unverifiable += 1
            return output
        verifier.checked += 1
        if first_mismatch(output, expected.to(output.dtype), verifier.tolerance) is None:
            verifier.reputation.record_check(hop.peer_id, passed=True)
            return output
        where = f"{kind} of blocks {hop.start}:{hop.end}"
        if not is_arbiter:
            verifier.unresolved += 1
            raise WrongOutputError(f"{hop.peer_id} and another server disagree on {where}")
        verifier.wrong += 1
        verifier.reputation.record_check(hop.peer_id, passed=False)
        verifier.reputation.ban(hop.peer_id, f"wrong {where}")
        logger.warning("banned %s: wrong %s", hop.peer_id, where)
        raise WrongOutputError(f"{hop.peer_id} answered the {where} wrong: a check found it")


def _local_forward(
    span: BlockSpan, hidden: torch.Tensor, adapter: SpanAdapter | None
) -> torch.Tensor:
    weight = next(span.parameters())
    if adapter is not None:
        adapter = adapter.to(device=weight.device, dtype=weight.dtype)
    with torch.inference_mode():
        output = span(hidden.to(device=weight.device, dtype=weight.dtype), adapter=adapter)
    return output.to(device=hidden.device, dtype=hidden.dtype)


def _local_backward(
    span: BlockSpan, hidden: torch.Tensor, grad_outputs: torch.Tensor, adapter: SpanAdapter | None
) -> Grads:
    weight = next(span.parameters())
    inputs = hidden.detach().to(device=weight.device, dtype=weight.dtype).requires_grad_(True)
    leaves: tuple[torch.Tensor, ...] = ()
    if adapter is not None:
        moved = adapter.to(device=weight.device, dtype=weight.dtype)
        leaves = tuple(t.detach().requires_grad_(True) for t in moved.tensors)
        adapter = SpanAdapter(adapter.layout, leaves)
    with torch.enable_grad():
        outputs = span(inputs, adapter=adapter)
        grads = torch.autograd.grad(
            outputs, (inputs, *leaves), grad_outputs.to(outputs), allow_unused=True
        )
    adapter_grads = tuple(
        torch.zeros_like(leaf) if grad is None else grad.float()
        for leaf, grad in zip(leaves, grads[1:], strict=True)
    )
    return Grads(grads[0].to(device=hidden.device, dtype=hidden.dtype), adapter_grads)


def _comparable(grads: Grads) -> torch.Tensor:
    """The gradients as one [1, positions, width] tensor for `first_mismatch`: the inputs'
    positions, then one row per block of each adapter gradient (zero-padded to a width)."""
    rows = [grads.inputs.reshape(-1, grads.inputs.shape[-1]).float()]
    rows += [grad.reshape(grad.shape[0], -1).float() for grad in grads.adapter]
    width = max(row.shape[1] for row in rows)
    padded = [torch.nn.functional.pad(row, (0, width - row.shape[1])) for row in rows]
    return torch.cat(padded, dim=0).unsqueeze(0)
