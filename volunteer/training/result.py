"""A finished job's result: each stage's trained tensors, taken from the stage's peers;
for a LoRA job, the whole model's adapter they make, for a job of the blocks, each
block's trained tensors.

The driver asks every live peer of a stage for its weights (`state`, weights only:
the optimizer's moments are no part of the result) and keeps the named tensors that
more than half of those answering hold byte for byte: every honest peer of a stage
applies the same aggregate to the same weights, so they agree exactly, and a lone
hostile peer cannot slip its own weights into the result.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import re

import torch
from hivemind.p2p import P2P

from volunteer.errors import VolunteerError
from volunteer.models.adapters import LORA_TARGETS
from volunteer.models.checkpoint import BLOCK_TENSORS
from volunteer.training.calls import TrainingCallError, call
from volunteer.training.job import TrainingJob

Named = dict[str, torch.Tensor]
_SPAN_NAME = re.compile(r"blocks\.(\d+)\.(.+)")


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
) -> Named:
    """The named trainable tensors of `stage` after `steps` steps that most of `peers`
    hold (module doc)."""
    answers = await asyncio.gather(
        *(_weights_of(p2p, peer, stage, steps, max_answer_bytes, timeout_s) for peer in peers)
    )
    held = [named for named in answers if named is not None]
    if not held:
        raise ResultError(f"no peer of stage {stage} handed over its weights after step {steps}")
    digests = [_digest(named) for named in held]
    digest, count = collections.Counter(digests).most_common(1)[0]
    if count * 2 <= len(held):
        raise ResultError(
            f"the {len(held)} peers of stage {stage} that answered hold different weights"
        )
    return held[digests.index(digest)]


async def _weights_of(
    p2p: P2P, peer: str, stage: int, steps: int, max_answer_bytes: int, timeout_s: float
) -> Named | None:
    try:
        answer, state = await call(
            p2p,
            peer,
            {"op": "state", "weights_only": True},
            timeout_s=timeout_s,
            max_answer_bytes=max_answer_bytes,
        )
    except TrainingCallError:
        return None
    names = answer.get("names")
    if (
        answer.get("stage") != stage
        or answer.get("steps") != steps
        or not isinstance(names, list)
        or not all(isinstance(name, str) for name in names)
        or not 0 < len(set(names)) == len(names) == len(state)
    ):
        return None
    if not all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in state):
        return None
    return dict(zip(names, state, strict=True))


def _digest(named: Named) -> str:
    hasher = hashlib.sha256()
    for name, tensor in named.items():
        hasher.update(repr((name, tensor.dtype, tuple(tensor.shape))).encode())
        hasher.update(tensor.contiguous().numpy().tobytes())
    return hasher.hexdigest()


def lora_adapter(job: TrainingJob, stages: list[Named]) -> Named:
    """A LoRA job's stages' adapters as one adapter of the whole model, named as the
    adapter store names them (`lora.<target>.a` [L, r, in], `lora.<target>.b` [L, out,
    r]): each stage's are stacked over its blocks."""
    if job.trains != "lora" or len(stages) != len(job.stages):
        raise ResultError("a LoRA job's adapter takes every stage's tensors")
    names = [f"lora.{target}.{part}" for target in LORA_TARGETS for part in "ab"]
    joined = {}
    for name in names:
        parts = [named.get(name) for named in stages]
        for (start, end), part in zip(job.stages, parts, strict=True):
            if part is None or part.dim() != 3 or part.shape[0] != end - start:
                raise ResultError(f"blocks {start}:{end} hand over no {name} of their blocks")
        joined[name] = torch.cat(parts).float().contiguous()  # type: ignore[arg-type]
    return joined


def block_weights(job: TrainingJob, stages: list[Named]) -> dict[int, Named]:
    """A job of the blocks: each block's trained tensors (model-wide block index ->
    name inside the block -> tensor), from the stages' span names."""
    if job.trains != "blocks" or len(stages) != len(job.stages):
        raise ResultError("a job of the blocks takes every stage's tensors")
    blocks: dict[int, Named] = collections.defaultdict(dict)
    for (start, end), named in zip(job.stages, stages, strict=True):
        for name, tensor in named.items():
            match = _SPAN_NAME.fullmatch(name)
            if match is None or match[2] not in BLOCK_TENSORS or int(match[1]) >= end - start:
                raise ResultError(f"blocks {start}:{end} hand over a tensor named {name[:80]!r}")
            blocks[start + int(match[1])][match[2]] = tensor.float().contiguous()
    return dict(blocks)
