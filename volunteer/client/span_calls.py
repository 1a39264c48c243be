"""forward and backward calls to one server's blocks, with a fine-tuning client's adapter
(`volunteer.models.adapters`) for the call, if any.

A reply is read within the bound a valid one has (hidden states of the request's shape,
and the adapter's gradients), and checked: the shapes it must have, finite values, and,
for a call with an adapter, the server's word that it applied it (a server that ignored
the field would answer a plausible, wrong output).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import torch
from hivemind.p2p import P2P, PeerID
from hivemind.proto import runtime_pb2

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from volunteer.client.calls import call_once, within
from volunteer.client.replies import MAX_REPLY_NUMEL, check_output, only_tensor, reply_bytes
from volunteer.models.adapters import SpanAdapter
from volunteer.transport.protocol import BACKWARD_HANDLE, FORWARD_HANDLE, BadReplyError


class Grads(NamedTuple):
    """What a backward answers: the gradient of its inputs, then those of its adapter's
    tensors (float32, in the adapter's order; empty without one)."""

    inputs: torch.Tensor
    adapter: tuple[torch.Tensor, ...] = ()


@dataclasses.dataclass(frozen=True)
class SpanCalls:
    """The forward/backward calls to blocks [start, end) on one server."""

    p2p: P2P
    peer_id: PeerID
    start: int
    end: int
    what: str

    async def forward(
        self, hidden: torch.Tensor, *, timeout_s: float, adapter: SpanAdapter | None = None
    ) -> torch.Tensor:
        """Hidden states [B, S, H] through the blocks (no cache); same dtype back."""
        reply = await self._single(FORWARD_HANDLE, [hidden], adapter, timeout_s, grads=False)
        self._check_adapted(reply, adapter)
        return check_output(only_tensor(reply, what=self.what), hidden, what=self.what)

    async def backward(
        self,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        *,
        timeout_s: float,
        adapter: SpanAdapter | None = None,
    ) -> Grads:
        """The gradients of the blocks' inputs (and adapter), given the inputs and the
        outputs' gradient."""
        tensors = [hidden, grad_outputs]
        reply = await self._single(BACKWARD_HANDLE, tensors, adapter, timeout_s, grads=True)
        self._check_adapted(reply, adapter)
        extra = () if adapter is None else adapter.tensors
        if len(reply.tensors) != 1 + len(extra):
            raise BadReplyError(
                f"{self.what} answered {len(reply.tensors)} tensors for a backward "
                f"that needs {1 + len(extra)}"
            )
        first = runtime_pb2.ExpertResponse(tensors=[reply.tensors[0]])
        grad = check_output(only_tensor(first, what=self.what), hidden, what=self.what)
        pairs = zip(reply.tensors[1:], extra, strict=True)
        return Grads(grad, tuple(self._adapter_grad(proto, like) for proto, like in pairs))

    async def _single(
        self,
        handle: str,
        tensors: list[torch.Tensor],
        adapter: SpanAdapter | None,
        timeout_s: float,
        *,
        grads: bool,
    ) -> runtime_pb2.ExpertResponse:
        spec = None
        limit = reply_bytes(tensors[0])
        if adapter is not None:
            layout = adapter.layout
            spec = wire.AdapterSpec(
                prompt_len=layout.prompt_len,
                rank=layout.rank,
                targets=layout.targets,
                scale=layout.scale,
            )
            tensors = [*tensors, *(t.detach().float() for t in adapter.tensors)]
            if grads:
                limit += sum(t.numel() for t in adapter.tensors) * 4 + 1024 * len(adapter.tensors)
        meta = wire.SpanRequest(start=self.start, end=self.end, adapter=spec)
        request = runtime_pb2.ExpertRequest(
            tensors=[framing.pack_tensor(t) for t in tensors], metadata=wire.pack_metadata(meta)
        )
        # One message over a stream: big tensors avoid the unary size limit; the reply
        # is read within the bound a valid one has.
        call = call_once(
            self.p2p,
            self.peer_id,
            handle,
            request,
            max_reply_bytes=limit,
            timeout_s=timeout_s,
            what=self.what,
        )
        return await within(call, timeout_s=timeout_s, what=self.what)

    def _check_adapted(
        self, reply: runtime_pb2.ExpertResponse, adapter: SpanAdapter | None
    ) -> None:
        if adapter is None:
            return
        try:
            adapted = wire.unpack_metadata(reply.metadata, wire.CallReply).adapted
        except wire.RemoteSpanError:
            adapted = False
        if not adapted:
            raise BadReplyError(f"{self.what} did not apply the call's adapter")

    def _adapter_grad(self, proto: runtime_pb2.Tensor, like: torch.Tensor) -> torch.Tensor:
        try:
            grad = framing.unpack_tensor(proto, max_numel=min(like.numel(), MAX_REPLY_NUMEL))
        except wire.BadRequestError as exc:
            reason = str(exc).removeprefix(wire.BadRequestError.marker)
            raise BadReplyError(f"{self.what} answered a bad adapter gradient: {reason}") from exc
        if grad.shape != like.shape or not torch.isfinite(grad).all():
            raise BadReplyError(
                f"{self.what} answered an adapter gradient {list(grad.shape)} "
                f"for {list(like.shape)}, or with NaN or infinite values"
            )
        return grad.float()
