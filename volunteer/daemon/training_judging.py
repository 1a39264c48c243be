"""How a daemon judges an accusation of a training peer (`Accusation.kind` "training"):
with the evidence alone (`volunteer.training.evidence`) and its own copy of the model.

The evidence must be of this swarm's model and of the accused's stage as the accusation
names it, and recent; the daemon then builds that stage from the model's files as a
training peer of it would, loads the weights the accused signed for, and recomputes
its work. A stage larger than this machine can spare memory for is not recomputed
(`CannotRecomputeError`: the accusation then counts toward a quorum of reputable
accusers, as serving's do).
"""

from __future__ import annotations

import time

import psutil

from volunteer.model_cache.served_model import ServedModel
from volunteer.scheduler.offload_cost import TransformerShape
from volunteer.training import judge
from volunteer.training.evidence import TrainingEvidence, is_wrong
from volunteer.training.stage import StageTrainer
from volunteer.trust.accusations import Accusation
from volunteer.trust.evidence import (
    CannotRecomputeError,
    EvidenceError,
    EvidenceLimitError,
)

MAX_POSITIONS = 1 << 14
"""Positions (batch x length) of one claimed microbatch this daemon recomputes: a
training pass holds every block's activations and attention at once."""
MEMORY_SHARE = 0.25
"""Of the memory available now, what recomputing one stage may take (its weights,
the evidence's copy and the gradients: about four copies of the stage)."""


def training_verdict(
    raw: bytes,
    accusation: Accusation,
    model: ServedModel,
    *,
    max_age_s: float,
    max_positions: int = MAX_POSITIONS,
) -> bool:
    """Whether the accused's training work in `raw` evidence is wrong. Blocks (run it
    in a thread).

    Raises:
        EvidenceError: the evidence does not hold, or is not of this accusation.
        EvidenceLimitError: older than `max_age_s`.
        UndecidableError: the recomputation is not finite.
        CannotRecomputeError: the stage is too large to load here.
    """
    from volunteer.models.checkpoint import load_ends, load_span

    evidence = TrainingEvidence.from_bytes(raw)
    claim = evidence.checked()
    job = evidence.job
    start, end = job.stages[claim.stage]
    if (claim.peer, start, end) != (accusation.accused, accusation.start, accusation.end):
        raise EvidenceError("the evidence is of another peer or stage than the accusation")
    if job.model != model.swarm_name or job.num_blocks != model.config.num_layers:
        raise EvidenceError(f"the evidence is of a job of another model than {model.swarm_name}")
    if time.time() - claim.issued_s > max_age_s:
        raise EvidenceLimitError("the evidence is of a step too old to judge")
    first, last = job.ends_of(claim.stage)
    per_work = judge.tensors_per_work(first=first, last=last)
    for given in evidence.tensors[::per_work]:
        if given.dim() != (2 if first else 3):
            raise EvidenceError("a claimed microbatch is not [batch, length(, width)]")
        batch, length = given.shape[:2]
        if length > model.config.max_position_embeddings or batch * length > max_positions:
            raise EvidenceLimitError(
                f"a microbatch of {batch} x {length} is over this peer's limits"
            )
    needed = 4 * 4 * TransformerShape.of(model.config).params_per_layer * (end - start)
    if needed > MEMORY_SHARE * psutil.virtual_memory().available:
        raise CannotRecomputeError(f"blocks {start}:{end} are too large to train here")
    span = load_span(model.folder, model.config, start, end)
    ends = load_ends(model.folder, model.config).requires_grad_(False)
    trainer = StageTrainer(span, job.optimizer, lora_rank=job.lora_rank or 0, seed=job.seed)
    evidence.load_into(trainer, claim)
    return is_wrong(evidence.distances(trainer, ends, claim))
