"""What a validator says of another stage peer's work in a step (the peer's `verify`
op): it recomputes, with the stage's weights, everything the target answered for its
microbatches and says how far each answer is from its own.

- `share`: the mean gradient the target sent its stage, against the recomputed one;
- `forward`: the hidden states it passed to the next stage (the loss it reported, on
  the last stage), against the recomputed ones: a liar's activations would poison
  every later stage's work while its own share stays honest;
- `backward`: the gradient w.r.t. its input it sent back (past the first stage).

Each is the largest relative distance over the microbatches (0 when the stage has no
such answer). The driver logs what the target answered and sends, per microbatch, the
tensors `tensors_per_work` counts: its input, the gradient w.r.t. its output (the
targets, on the last stage), the output it answered (not on the last stage) and the
input gradient it answered (not on the first); the last stage's losses go in the
header.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch

from volunteer.models.model import ModelEnds
from volunteer.training.stage import StageError, StageTrainer

VERDICTS = ("share", "forward", "backward")
TOLERANCE = 1e-3
"""Relative distance between an answer and its recomputation that counts as a mismatch
(honest recomputation on the same kind of machine differs by float rounding only)."""


def tensors_per_work(*, first: bool, last: bool) -> int:
    return 2 + (not last) + (not first)


def distances(
    trainer: StageTrainer,
    ends: ModelEnds,
    *,
    first: bool,
    last: bool,
    received: torch.Tensor,
    tensors: list[torch.Tensor],
    losses: list[float] | None,
    embed: Callable[[torch.Tensor], torch.Tensor],
) -> dict[str, float]:
    """The distances (module doc) of a target's answers; `received` is the share it
    sent, `embed` makes a microbatch's input the stage's hidden states."""
    size = tensors_per_work(first=first, last=last)
    if not tensors or len(tensors) % size:
        raise StageError(f"verify takes groups of {size} tensors per microbatch here")
    groups = [tensors[at : at + size] for at in range(0, len(tensors), size)]
    if last and (losses is None or len(losses) != len(groups)):
        raise StageError("verify on the last stage takes each microbatch's loss")
    items, claimed_out, claimed_in, recomputed_losses = [], [], [], []
    for group in groups:
        hidden, second = embed(group[0]), group[1]
        if last:
            loss, second = trainer.output_gradient(hidden, second, ends)
            recomputed_losses.append(loss)
        else:
            claimed_out.append(group[2])
        if not first:
            claimed_in.append(group[-1])
        items.append((hidden, second))
    again = trainer.recompute(items)
    if last:
        forward = _worst(map(relative_distance, losses or [], recomputed_losses))
    else:
        forward = _worst(map(relative_distance, claimed_out, again.outputs))
    backward = _worst(map(relative_distance, claimed_in, again.input_grads))
    return {
        "share": relative_distance(received, again.share.float()),
        "forward": forward,
        "backward": backward,
    }


def stage_input(ends: ModelEnds, tensor: torch.Tensor, *, first: bool) -> torch.Tensor:
    """A microbatch's input to a stage: token ids embedded on the first.

    Raises:
        StageError: the first stage's input is not token ids of the vocabulary.
    """
    if not first:
        return tensor
    if tensor.dtype != torch.int64 or tensor.dim() != 2:
        raise StageError("the first stage takes token ids, int64 [batch, seq]")
    if bool(((tensor < 0) | (tensor >= ends.config.vocab_size)).any()):
        raise StageError("token ids out of the vocabulary")
    with torch.no_grad():
        return ends.embed(tensor)


def relative_distance(claimed: torch.Tensor | float, honest: torch.Tensor | float) -> float:
    """How far an answer (a tensor or a loss) is from its recomputation, relative to
    the recomputation (inf for another shape or a non-finite answer; NaN for a
    non-finite recomputation, which says nothing of the answer)."""
    claimed, honest = torch.as_tensor(claimed).double(), torch.as_tensor(honest).double()
    if not bool(torch.isfinite(honest).all()):
        return float("nan")
    if claimed.shape != honest.shape or not bool(torch.isfinite(claimed).all()):
        return float("inf")
    return float((claimed - honest).norm() / honest.norm().clamp(min=1e-12))


def _worst(found: Iterable[float]) -> float:
    """The largest distance; NaN if any is (a recomputation that says nothing)."""
    values = list(found)
    if any(math.isnan(value) for value in values):
        return float("nan")
    return max(values, default=0.0)


def differs(given: torch.Tensor | float | None, again: torch.Tensor | float | None) -> bool:
    """Whether an answer is other than the same pass run again (None: none to compare)."""
    return given is not None and again is not None and relative_distance(given, again) > TOLERANCE
