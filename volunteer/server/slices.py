"""Long forward and backward calls computed as a series of short compute jobs.

The server has one compute thread (`volunteer.server.compute.PriorityCompute`), and a job
that runs cannot be preempted: an inference step that arrives while a forward of
hundreds of positions runs waits for all of it, whatever its priority. So a call is cut
into slices, each queued as its own job, and a step waits for one slice at most.

A slice's size is counted in block-positions: rows (batch * positions) times blocks.
`SliceBudget` picks how many make one slice from how long slices took so far, aiming at
`forward_slice_s` each.

- Forward: while the whole call fits the budget, one job; else groups of blocks over all
  positions; and where one block over all positions is still too much, one block at a
  time over runs of positions, each run attending to the earlier ones through a KV cache
  of that one block (a causal prefill, as an inference session does it).
- Backward: the inputs of each group of blocks are computed first (no autograd), then
  each group, last first, recomputes its forward with autograd and takes the gradient
  (activation checkpointing per group). Positions cannot be split here: a position's
  gradient depends on every later one. A slice is at least one block over all the call's
  positions, which `max_backward_tokens` bounds.
- A call with an adapter (`volunteer.models.adapters`: a fine-tuning client's deep
  prompts and LoRA) is cut into groups of blocks only, each applying its part of the
  adapter; its backward also returns the adapter's gradients, group by group.

The slices' state lives in `SlicedForward` / `SlicedBackward`; they are touched only by
their jobs, one at a time, on the compute thread.
"""

from __future__ import annotations

import dataclasses
import time

import torch

from volunteer.models.adapters import SpanAdapter
from volunteer.models.kv_cache import KVCache
from volunteer.models.model import BlockSpan
from volunteer.server.compute import PRIORITY_TRAINING, PriorityCompute, run_blocks, to_span

UNITS_BEFORE_MEASURED = 64
"""Block-positions per slice before any slice or decode step was timed."""
BACKWARD_COST = 3
"""A block-position of backward costs about this many of forward (recompute, then the
gradients of inputs and weights' paths)."""


@dataclasses.dataclass(frozen=True)
class Slice:
    """Blocks [start, end) over positions [first, last) of a call."""

    start: int
    end: int
    first: int
    last: int


def forward_plan(
    batch: int, seq: int, start: int, end: int, units: int, *, split_positions: bool = True
) -> list[Slice]:
    """The slices of a forward of [batch, seq] through blocks [start, end), each at most
    `units` block-positions where one block (and, if `split_positions`, one position)
    allow it."""
    units = max(units, 1)
    rows = batch * seq
    if rows * (end - start) <= units:
        return [Slice(start, end, 0, seq)]
    if not split_positions:
        step = max(units // rows, 1)
        return [Slice(b, min(b + step, end), 0, seq) for b in range(start, end, step)]
    if rows <= units:
        step = units // rows
        return [Slice(b, min(b + step, end), 0, seq) for b in range(start, end, step)]
    run = max(units // batch, 1)
    return [
        Slice(b, b + 1, first, min(first + run, seq))
        for b in range(start, end)
        for first in range(0, seq, run)
    ]


def backward_groups(batch: int, seq: int, start: int, end: int, units: int) -> list[Slice]:
    """The block groups of a backward (each over all positions), first to last."""
    step = max(max(units, 1) // (BACKWARD_COST * batch * seq), 1)
    return [Slice(b, min(b + step, end), 0, seq) for b in range(start, end, step)]


class SliceBudget:
    """How many block-positions one slice may take to last about `target_s`."""

    def __init__(self, target_s: float) -> None:
        self.target_s = target_s
        self._s_per_unit: float | None = None
        """Seconds per block-position of the slices measured so far (a moving average)."""

    def units(self, *, decode_s: float | None = None, blocks: int = 1) -> int:
        """Block-positions per slice now.

        Args:
            decode_s, blocks: the last decode step's time and how many blocks it ran,
                a first guess (one position costs at least its share of a batch).
        """
        if self.target_s <= 0:
            return 1
        per_unit = self._s_per_unit
        if per_unit is None and decode_s is not None:
            per_unit = decode_s / max(blocks, 1)
        if per_unit is None or per_unit <= 0:
            return UNITS_BEFORE_MEASURED
        return max(int(self.target_s / per_unit), 1)

    def record(self, units: int, seconds: float) -> None:
        """A slice of `units` block-positions took `seconds` (called on the compute thread;
        one float store, so the event loop never sees a torn value). On a GPU that is the
        time to launch the slice's kernels: slices grow there, where calls are short."""
        measured = seconds / max(units, 1)
        old = self._s_per_unit
        self._s_per_unit = measured if old is None else (old + measured) / 2


class SlicedForward:
    """One forward call's hidden states between its slices."""

    def __init__(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        end: int,
        budget: SliceBudget | None = None,
        adapter: CallAdapter | None = None,
    ) -> None:
        self.span = span
        self.request = hidden
        self.end = end
        self.adapter = adapter
        """The call's last block + 1: its slice that ends there and at the last position
        is the last."""
        self.budget = budget
        self._hidden = hidden
        """The input of the next block (the output of the blocks done so far); moved to
        the span's device and dtype by the first slice, on the compute thread."""
        self._next: torch.Tensor | None = None
        """The block in progress's output, filled run by run (position slices only)."""
        self._cache: KVCache | None = None

    def run(self, piece: Slice) -> torch.Tensor | None:
        """Computes one slice (slices must come in their plan's order); the last returns
        the call's output, in the request's dtype and on its device (a copy from a GPU
        waits for it: done here, on the compute thread, never on the event loop)."""
        began = time.perf_counter()
        self._hidden = to_span(self.span, self._hidden)
        batch, seq, _ = self._hidden.shape
        with torch.inference_mode():
            if (piece.first, piece.last) == (0, seq):
                adapter = None if self.adapter is None else self.adapter.part(self.span, piece)
                self._hidden = run_blocks(
                    self.span, self._hidden, piece.start, piece.end, 0, None, adapter
                )
            else:
                self._run_positions(piece, seq)
        if self.budget is not None:
            units = batch * (piece.last - piece.first) * (piece.end - piece.start)
            self.budget.record(units, time.perf_counter() - began)
        if (piece.end, piece.last) != (self.end, seq):
            return None
        return self._hidden.detach().to(device=self.request.device, dtype=self.request.dtype)

    def _run_positions(self, piece: Slice, seq: int) -> None:
        if self._cache is None:
            # One block's cache, rewritten by each block in turn: a run attends only to
            # the runs of its own block before it.
            self._cache = KVCache.allocate(
                self.span.config,
                num_blocks=1,
                batch_size=self._hidden.shape[0],
                max_length=seq,
                dtype=self._hidden.dtype,
                device=self._hidden.device,
            )
        if piece.first == 0:
            self._next = torch.empty_like(self._hidden)
        assert self._next is not None  # set by the block's first run
        part = self._hidden[:, piece.first : piece.last]
        output = run_blocks(self.span, part, piece.start, piece.end, piece.first, self._cache)
        self._next[:, piece.first : piece.last] = output
        if piece.last == seq:
            self._hidden, self._next = self._next, None


@dataclasses.dataclass
class CallAdapter:
    """A call's adapter (for its blocks from `start` on), and its gradients once a
    backward has them."""

    adapter: SpanAdapter
    start: int
    """The model block of the adapter's first block."""
    grads: list[torch.Tensor] | None = None

    def part(self, span: BlockSpan, piece: Slice, *, trainable: bool = False) -> SpanAdapter:
        """The adapter of the piece's blocks, on the span's device and dtype (leaf tensors
        that take gradients if `trainable`)."""
        part = self.adapter.narrow(piece.start - self.start, piece.end - piece.start)
        moved = tuple(to_span(span, t).detach().requires_grad_(trainable) for t in part.tensors)
        return SpanAdapter(part.layout, moved)

    def keep_grads(self, piece: Slice, grads: tuple[torch.Tensor, ...]) -> None:
        if self.grads is None:
            self.grads = [torch.zeros_like(t) for t in self.adapter.tensors]
        for total, grad in zip(self.grads, grads, strict=True):
            total.narrow(0, piece.start - self.start, piece.end - piece.start).copy_(grad)


class SlicedBackward:
    """One backward call: the inputs of its block groups, then the gradient group by
    group from the last."""

    def __init__(
        self,
        span: BlockSpan,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        groups: list[Slice],
        budget: SliceBudget | None = None,
        adapter: CallAdapter | None = None,
    ) -> None:
        self.span = span
        self.request = hidden
        self.groups = groups
        self.budget = budget
        self.adapter = adapter
        # Moved to the span's device and dtype by the jobs, on the compute thread.
        self._inputs = [hidden.detach()]
        self._grad = grad_outputs

    def forward_group(self, index: int) -> None:
        """The input of group index + 1 (groups in order; the last one's is not needed)."""
        group = self.groups[index]
        adapter = None if self.adapter is None else self.adapter.part(self.span, group)
        # no_grad rather than inference_mode: these inputs are later saved for autograd.
        with torch.no_grad():
            inputs = self._inputs[index] = to_span(self.span, self._inputs[index])
            output = run_blocks(self.span, inputs, group.start, group.end, 0, None, adapter)
        self._inputs.append(output)

    def backward_group(self, index: int) -> torch.Tensor | None:
        """The gradient of group index's input (groups from the last); the first group
        returns the call's answer, in the request's dtype and on its device (and leaves
        the adapter's gradients in `adapter.grads`)."""
        began = time.perf_counter()
        group = self.groups[index]
        adapter = None
        if self.adapter is not None:
            adapter = self.adapter.part(self.span, group, trainable=True)
        with torch.enable_grad():
            inputs = to_span(self.span, self._inputs[index]).requires_grad_(True)
            outputs = run_blocks(self.span, inputs, group.start, group.end, 0, None, adapter)
            grad_outputs = to_span(self.span, self._grad)
            wrt = (inputs, *(adapter.tensors if adapter is not None else ()))
            grads = torch.autograd.grad(outputs, wrt, grad_outputs, allow_unused=True)
        self._grad = grads[0]
        if self.adapter is not None and adapter is not None:
            # A deep prompt longer than the call's positions leaves its tail unused: zero.
            filled = tuple(
                torch.zeros_like(t) if g is None else g
                for t, g in zip(adapter.tensors, grads[1:], strict=True)
            )
            self.adapter.keep_grads(group, filled)
        del self._inputs[index:]  # no longer needed: freed group by group
        if self.budget is not None:
            batch, seq, _ = inputs.shape
            units = BACKWARD_COST * batch * seq * (group.end - group.start)
            self.budget.record(units, time.perf_counter() - began)
        if index:
            return None
        if self.adapter is not None and self.adapter.grads is not None:
            self.adapter.grads = [
                g.detach().to(device=self.request.device, dtype=torch.float32)
                for g in self.adapter.grads
            ]
        return self._grad.detach().to(device=self.request.device, dtype=self.request.dtype)


async def sliced_forward(
    compute: PriorityCompute,
    span: BlockSpan,
    hidden: torch.Tensor,
    start: int,
    end: int,
    *,
    peer: str,
    budget: SliceBudget,
    adapter: SpanAdapter | None = None,
) -> torch.Tensor:
    """A forward call's output, computed slice by slice on `compute` for `peer`."""
    units = budget.units(decode_s=compute.decode_s, blocks=span.num_blocks)
    batch, seq = hidden.shape[0], hidden.shape[1]
    plan = forward_plan(batch, seq, start, end, units, split_positions=adapter is None)
    call_adapter = None if adapter is None else CallAdapter(adapter, start)
    forward = SlicedForward(span, hidden, end, budget, call_adapter)
    output = None
    for piece in plan:
        output = await compute.run(PRIORITY_TRAINING, forward.run, piece, peer=peer)
    assert output is not None  # the plan's last slice answers
    return output


async def sliced_backward(
    compute: PriorityCompute,
    span: BlockSpan,
    hidden: torch.Tensor,
    grad_outputs: torch.Tensor,
    start: int,
    end: int,
    *,
    peer: str,
    budget: SliceBudget,
    adapter: SpanAdapter | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """A backward call's gradients, computed group by group on `compute` for `peer`: of
    its inputs, and of its adapter's tensors (float32; none without an adapter)."""
    units = budget.units(decode_s=compute.decode_s, blocks=span.num_blocks)
    groups = backward_groups(hidden.shape[0], hidden.shape[1], start, end, units)
    call_adapter = None if adapter is None else CallAdapter(adapter, start)
    backward = SlicedBackward(span, hidden, grad_outputs, groups, budget, call_adapter)
    for index in range(len(groups) - 1):
        await compute.run(PRIORITY_TRAINING, backward.forward_group, index, peer=peer)
    grad = None
    for index in reversed(range(len(groups))):
        grad = await compute.run(PRIORITY_TRAINING, backward.backward_group, index, peer=peer)
    assert grad is not None  # the first group answers
    adapter_grads = () if call_adapter is None else tuple(call_adapter.grads or ())
    return grad, adapter_grads
