"""A finished job's result: each stage's trained tensors, taken from the stage's peers,
and for a LoRA job the whole model's adapter they make.

The driver asks every live peer of a stage for its state (`state`, which hands the
driver a copy as it hands one to a peer that syncs) and keeps the tensors that more than
half of those answering hold byte for byte: every honest peer of a stage applies the
same aggregate to the same weights, so they agree exactly, and a lone hostile peer
cannot slip its own weights into the result.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib

import torch
from hivemind.p2p import P2P

from volunteer.errors import VolunteerError
from volunteer.models.adapters import LORA_TARGETS
from volunteer.training.calls import TrainingCallError, call
from volunteer.training.job import TrainingJob


class ResultError(VolunteerError):
    """A stage's trained tensors could not be taken: no peer, or no majority."""


async def agreed_stage_weights(
    p2p: P2P,
    peers: list[str],
    *,
    stage: int,
    steps: int,
    max_answer_bytes: int,
    timeout_s: float,
) -> list[torch.Tensor]:
    """The trainable tensors of `stage` after `steps` steps that most of `peers` hold
    (module doc)."""
    answers = await asyncio.gather(
        *(_weights_of(p2p, peer, stage, steps, max_answer_bytes, timeout_s) for peer in peers)
    )
    held = [tensors for tensors in answers if tensors is not None]
    if not held:
        raise ResultError(f"no peer of stage {stage} handed over its weights after step {steps}")
    digests = [_digest(tensors) for tensors in held]
    digest, count = collections.Counter(digests).most_common(1)[0]
    if count * 2 <= len(held):
        raise ResultError(
            f"the {len(held)} peers of stage {stage} that answered hold different weights"
        )
    return held[digests.index(digest)]


async def _weights_of(
    p2p: P2P, peer: str, stage: int, steps: int, max_answer_bytes: int, timeout_s: float
) -> list[torch.Tensor] | None:
    try:
        answer, state = await call(
            p2p, peer, {"op": "state"}, timeout_s=timeout_s, max_answer_bytes=max_answer_bytes
        )
    except TrainingCallError:
        return None
    count = answer.get("params")
    if (
        answer.get("stage") != stage
        or answer.get("steps") != steps
        or type(count) is not int
        or not 0 < count <= len(state)
    ):
        return None
    weights = state[:count]
    if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in weights):
        return None
    return weights


def _digest(tensors: list[torch.Tensor]) -> str:
    hasher = hashlib.sha256()
    for tensor in tensors:
        hasher.update(repr((tensor.dtype, tuple(tensor.shape))).encode())
        hasher.update(tensor.contiguous().numpy().tobytes())
    return hasher.hexdigest()


def lora_adapter(job: TrainingJob, stages: list[list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """A LoRA job's stages' adapters as one adapter of the whole model, named as the
    adapter store names them (`lora.<target>.a` [L, r, in], `lora.<target>.b` [L, out,
    r]): each stage holds A then B per target, stacked over its blocks."""
    if job.trains != "lora" or len(stages) != len(job.stages):
        raise ResultError("a LoRA job's adapter takes every stage's tensors")
    named: dict[str, list[torch.Tensor]] = collections.defaultdict(list)
    for (start, end), tensors in zip(job.stages, stages, strict=True):
        if len(tensors) != 2 * len(LORA_TARGETS):
            raise ResultError(f"blocks {start}:{end} hand over {len(tensors)} tensors, not LoRA's")
        for index, target in enumerate(LORA_TARGETS):
            a, b = tensors[2 * index], tensors[2 * index + 1]
            if a.shape[0] != end - start or b.shape[0] != end - start:
                raise ResultError(f"blocks {start}:{end} hand over adapters of other blocks")
            named[f"lora.{target}.a"].append(a)
            named[f"lora.{target}.b"].append(b)
    return {name: torch.cat(parts).float().contiguous() for name, parts in named.items()}
