"""The frozen blocks a fine-tuning client trains through: in this process, or in the swarm.

Both take hidden states and the adapter's tensors and return the blocks' output with a
gradient path to both, so the training loop is one piece of code whichever runs them.
Through the swarm, the forward keeps each hop's inputs (`volunteer.client.spread`); the
backward sends the output gradient back hop by hop, last first, and gets the input and
adapter gradients back: the servers keep nothing between the two.
"""

from __future__ import annotations

import asyncio
from typing import Any, Protocol

import torch

from volunteer.client.loop_bridge import run_on_loop
from volunteer.client.spread import TracedHop
from volunteer.client.swarm_client import SwarmClient
from volunteer.models.adapters import AdapterLayout, SpanAdapter
from volunteer.models.model import BlockSpan

CALL_TIMEOUT_S = 600.0
"""Longest wait for a whole forward or backward through the swarm, failovers included."""


class Blocks(Protocol):
    """Every block of the model, run with a gradient path to the inputs and adapter."""

    def __call__(self, hidden: torch.Tensor, adapter: SpanAdapter | None) -> torch.Tensor: ...


class LocalBlocks:
    """The whole model's blocks in this process (frozen)."""

    def __init__(self, span: BlockSpan) -> None:
        self.span = span.requires_grad_(False)

    def __call__(self, hidden: torch.Tensor, adapter: SpanAdapter | None) -> torch.Tensor:
        return self.span(hidden, adapter=adapter)


class SwarmBlocks:
    """Every block in the swarm, through a `SwarmClient` living on `loop`."""

    def __init__(self, client: SwarmClient, loop: asyncio.AbstractEventLoop) -> None:
        self.client = client
        self.loop = loop

    def __call__(self, hidden: torch.Tensor, adapter: SpanAdapter | None) -> torch.Tensor:
        layout = None if adapter is None else adapter.layout
        tensors = () if adapter is None else adapter.tensors
        return _ThroughSwarm.apply(self, layout, hidden, *tensors)

    def forward(
        self, hidden: torch.Tensor, adapter: SpanAdapter | None
    ) -> tuple[torch.Tensor, list[TracedHop]]:
        call = self.client.forward(hidden, adapter=adapter)
        return run_on_loop(call, self.loop, timeout_s=CALL_TIMEOUT_S, what="a forward")

    def backward(
        self, trace: list[TracedHop], grad_outputs: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        call = self.client.backward(trace, grad_outputs)
        grads = run_on_loop(call, self.loop, timeout_s=CALL_TIMEOUT_S, what="a backward")
        return grads.inputs, grads.adapter


class _ThroughSwarm(torch.autograd.Function):
    """Autograd's view of a forward through the swarm: its backward is the swarm's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        blocks: SwarmBlocks,
        layout: AdapterLayout | None,
        hidden: torch.Tensor,
        *tensors: torch.Tensor,
    ) -> torch.Tensor:
        adapter = None
        if layout is not None:
            adapter = SpanAdapter(layout, tuple(t.detach() for t in tensors))
        output, trace = blocks.forward(hidden.detach(), adapter)
        ctx.blocks, ctx.trace, ctx.count = blocks, trace, len(tensors)
        # A hop on this process's own server answers an inference-mode tensor, on which
        # autograd records nothing: a plain copy joins the graph.
        return output.clone() if output.is_inference() else output

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        grad, adapter_grads = ctx.blocks.backward(ctx.trace, grad_output.contiguous())
        grad = grad.clone() if grad.is_inference() else grad
        ctx.trace = None  # the kept inputs: freed as soon as they are used
        if ctx.count and len(adapter_grads) != ctx.count:
            raise RuntimeError("the swarm answered the wrong number of adapter gradients")
        return (None, None, grad, *adapter_grads)


def causal_loss(
    ends: torch.nn.Module,
    prompt: torch.Tensor | None,
    adapter: SpanAdapter | None,
    blocks: Blocks,
    input_ids: torch.Tensor,
    targets: torch.Tensor,
) -> tuple[torch.Tensor, int]:
    """The mean next-token loss over the target tokens of a batch, and how many there are.

    Args:
        ends: the model's `ModelEnds` (embedding and head), frozen.
        prompt: [P, H] soft prompt put in front of every sequence, or None.
        adapter: what the blocks apply (deep prompts, LoRA), or None.
        input_ids, targets: [B, S] tokens and which of them the loss counts
            (`volunteer.finetune.data.Batch`).
    """
    hidden = ends.embed(input_ids)
    prefix = 0
    if prompt is not None:
        prefix = prompt.shape[0]
        batch = input_ids.shape[0]
        hidden = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1).to(hidden), hidden], 1)
    output = blocks(hidden, adapter)[:, prefix:]
    # Position t predicts token t + 1: the logits of every position but the last, against
    # the tokens after them, where those are targets.
    wanted = targets[:, 1:]
    count = int(wanted.sum())
    logits = ends.logits(output[:, :-1][wanted])
    loss = torch.nn.functional.cross_entropy(logits.float(), input_ids[:, 1:][wanted])
    return loss, count
