"""forward/backward calls of a block server: hidden states through its blocks with no
cache (what fine-tuning and spot checks run), each with the calling client's adapter, if
any, for that call only (`volunteer.models.adapters`).

A mixin of `BlockHandler`, which owns the state these methods use; hivemind finds the
`rpc_` methods through the handler's class.
"""

from __future__ import annotations

import typing

import torch
from hivemind.p2p import P2PContext
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.models.adapters import SpanAdapter
from volunteer.models.model import BlockSpan
from volunteer.server import validation
from volunteer.server.caps import ServerCaps
from volunteer.server.compute import PriorityCompute
from volunteer.server.local_stream import LOCAL_PEER
from volunteer.server.slices import SliceBudget, sliced_backward, sliced_forward
from volunteer.server.validation import ServerLimits, only_request
from volunteer.server.work_log import ServeStats
from volunteer.transport.protocol import BadRequestError

# See handler.py: hivemind tells stream RPCs by typing.AsyncIterator's `_name`.
AsyncIterator = typing.AsyncIterator


class TrainingCalls:
    """The forward/backward half of `BlockHandler` (see the module)."""

    span: BlockSpan
    limits: ServerLimits
    caps: ServerCaps
    compute: PriorityCompute
    stats: ServeStats
    slice_budget: SliceBudget
    # Also the handler's: _check_not_paused, _drilled, hidden_tensors, check_hidden.

    async def rpc_forward(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        context: P2PContext | None = None,
        *,
        peer: str,
    ) -> runtime_pb2.ExpertResponse:
        """Hidden states [B, S, H] through blocks [start, end), no cache, with the call's
        adapter if any (served as a plain stream: `volunteer.server.calls`, which names
        the peer)."""
        request = await only_request(requests, timeout_s=self.limits.idle_timeout_s)
        meta = wire.unpack_metadata(request.metadata, wire.SpanRequest)
        validation.check_span(self.span, meta)
        (hidden,), adapter = self._call_tensors(request, meta, count=1)
        output = await self._forward(hidden, meta.start, meta.end, peer, adapter)
        return _call_reply([output], adapted=adapter is not None)

    async def rpc_backward(
        self,
        requests: AsyncIterator[runtime_pb2.ExpertRequest],
        context: P2PContext | None = None,
        *,
        peer: str,
    ) -> runtime_pb2.ExpertResponse:
        """Given inputs [B, S, H] and the grad of the outputs, the grad of the inputs (and
        then those of the call's adapter tensors, if any)."""
        request = await only_request(requests, timeout_s=self.limits.idle_timeout_s)
        meta = wire.unpack_metadata(request.metadata, wire.SpanRequest)
        validation.check_span(self.span, meta)
        (hidden, grad_outputs), adapter = self._call_tensors(request, meta, count=2)
        grad, adapter_grads = await self._backward(
            hidden, grad_outputs, meta.start, meta.end, peer, adapter
        )
        return _call_reply([grad, *adapter_grads], adapted=adapter is not None)

    async def run_forward(
        self, hidden: torch.Tensor, start: int, end: int, adapter: SpanAdapter | None = None
    ) -> torch.Tensor:
        """`rpc_forward` for a tensor that came in-process (this peer's own client)."""
        validation.check_span(self.span, wire.SpanRequest(start=start, end=end))
        self.check_hidden(hidden)
        return await self._forward(hidden, start, end, LOCAL_PEER, adapter)

    async def run_backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        adapter: SpanAdapter | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """`rpc_backward` for tensors that came in-process (this peer's own client)."""
        validation.check_span(self.span, wire.SpanRequest(start=start, end=end))
        self.check_hidden(hidden)
        self.check_hidden(grad_outputs)
        return await self._backward(hidden, grad_outputs, start, end, LOCAL_PEER, adapter)

    def _call_tensors(
        self, request: runtime_pb2.ExpertRequest, meta: wire.SpanRequest, *, count: int
    ) -> tuple[list[torch.Tensor], SpanAdapter | None]:
        """A call's `count` hidden-state tensors, then its adapter's, if it has one."""
        layout = validation.adapter_layout(meta)
        extra = 0 if layout is None else len(layout.shapes(self.span.config, 1))
        hidden = self.hidden_tensors(request, count=count, adapter_tensors=extra)
        if layout is None:
            return hidden, None
        adapter = validation.call_adapter(
            request,
            meta,
            layout,
            config=self.span.config,
            skip=count,
            max_bytes=self.caps.max_adapter_bytes,
        )
        return hidden, adapter

    async def _forward(
        self,
        hidden: torch.Tensor,
        start: int,
        end: int,
        peer: str,
        adapter: SpanAdapter | None = None,
    ) -> torch.Tensor:
        self._check_not_paused()
        if adapter is not None:
            validation.check_backward(hidden, self.caps.max_backward_tokens)
        compute, budget = self.compute, self._budget()
        output = await sliced_forward(
            compute, self.span, hidden, start, end, peer=peer, budget=budget, adapter=adapter
        )
        self.stats.count(hidden, peer, "forward")
        return self._drilled((peer, "forward"), output)

    def _budget(self) -> SliceBudget:
        # The caps may change under a running server (tests do): follow them.
        if self.slice_budget.target_s != self.caps.forward_slice_s:
            self.slice_budget = SliceBudget(self.caps.forward_slice_s)
        return self.slice_budget

    async def _backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        start: int,
        end: int,
        peer: str,
        adapter: SpanAdapter | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        self._check_not_paused()
        if hidden.shape != grad_outputs.shape:
            raise BadRequestError(
                f"grad_outputs shape {list(grad_outputs.shape)} != "
                f"hidden shape {list(hidden.shape)}"
            )
        validation.check_backward(hidden, self.caps.max_backward_tokens)
        span, budget = self.span, self._budget()
        grad, adapter_grads = await sliced_backward(
            self.compute,
            span,
            hidden,
            grad_outputs,
            start,
            end,
            peer=peer,
            budget=budget,
            adapter=adapter,
        )
        self.stats.count(hidden, peer, "backward")
        drilled = tuple(
            self._drilled((peer, "backward", index), each)
            for index, each in enumerate(adapter_grads)
        )
        return self._drilled((peer, "backward"), grad), drilled


def _call_reply(tensors: list[torch.Tensor], *, adapted: bool) -> runtime_pb2.ExpertResponse:
    packed = [framing.pack_tensor(t) for t in tensors]
    if not adapted:
        return runtime_pb2.ExpertResponse(tensors=packed)
    meta = wire.pack_metadata(wire.CallReply(adapted=True))
    return runtime_pb2.ExpertResponse(tensors=packed, metadata=meta)
