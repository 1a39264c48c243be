"""Evidence that a stage peer's share or answers were wrong, which anyone holding the
job's model can check without asking anyone (BTARD's accusation with proof).

It holds the job record, the accused's signed claim (`volunteer.training.claims`), the
share it sent, the stage's trained weights the claim names, and each microbatch's
tensors as a validator got them (`judge.tensors_per_work`, in the claim's order). A
judge checks that the claim is the accused's and that every tensor is the one it
signed (`TrainingEvidence.checked`), loads the weights into a fresh stage of the job's
model (`load_into`) and recomputes (`distances`): an answer further than
`judge.TOLERANCE` from its recomputation convicts.

Evidence travels as one training message (`volunteer.training.wire`: no pickle,
bounded, finite tensors), named by its sha256 like the serving checks' evidence
(`volunteer.trust.evidence`), within the same `MAX_EVIDENCE_BYTES`: a stage too large
to fit (the full blocks of a large model) is banned within its job only.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from volunteer.models.model import ModelEnds
from volunteer.swarm.records import RecordError
from volunteer.training import judge, wire
from volunteer.training.claims import ShareClaim, SignedClaim, WorkClaim, weights_digest
from volunteer.training.job import TrainingJob
from volunteer.training.stage import StageError, StageTrainer
from volunteer.transport.commitment import CommitmentError, tensor_digest
from volunteer.trust.evidence import (
    MAX_EVIDENCE_BYTES,
    EvidenceError,
    EvidenceLimitError,
    UndecidableError,
)

_VERSION = 1


@dataclasses.dataclass
class TrainingEvidence:
    job: TrainingJob
    claim: SignedClaim
    share: torch.Tensor
    weights: list[torch.Tensor]
    tensors: list[torch.Tensor]
    """Each microbatch's tensors (`judge.tensors_per_work`), in the claim's order."""

    def to_bytes(self) -> bytes:
        header = {
            "v": _VERSION,
            "job": self.job.to_wire(),
            "weights": len(self.weights),
            **self.claim.to_header(),
        }
        return wire.pack(header, [self.share, *self.weights, *self.tensors])

    @classmethod
    def from_bytes(cls, raw: bytes) -> TrainingEvidence:
        """Parses evidence from a peer (its shape only: see `checked`).

        Raises:
            EvidenceError: not training evidence of this version.
            EvidenceLimitError: over `MAX_EVIDENCE_BYTES`.
        """
        if len(raw) > MAX_EVIDENCE_BYTES:
            raise EvidenceLimitError(f"evidence of {len(raw)} bytes exceeds {MAX_EVIDENCE_BYTES}")
        try:
            header, tensors = wire.unpack(raw)
            if header.get("v") != _VERSION:
                raise EvidenceError("not training evidence of a version this peer reads")
            job = TrainingJob.from_wire(header.get("job"))
            count = header.get("weights")
            if type(count) is not int or not 1 <= count < len(tensors):
                raise EvidenceError("the evidence holds no weights")
            claim = SignedClaim.from_header(header)
        except (wire.WireError, RecordError, CommitmentError) as exc:
            raise EvidenceError(f"malformed training evidence: {exc}") from None
        return cls(job, claim, tensors[0], tensors[1 : 1 + count], tensors[1 + count :])

    def checked(self) -> ShareClaim:
        """The claim, once it is its signer's and every tensor here is one it signed.

        Raises:
            EvidenceError: the evidence does not hold.
        """
        try:
            claim = self.claim.check()
        except CommitmentError as exc:
            raise EvidenceError(f"the evidence does not hold: {exc}") from None
        if claim.job != self.job.job_id or claim.stage >= len(self.job.stages):
            raise EvidenceError("the claim is not of the evidence's job and its stages")
        first, last = self.job.ends_of(claim.stage)
        size = judge.tensors_per_work(first=first, last=last)
        if len(self.tensors) != size * len(claim.works):
            raise EvidenceError(f"the evidence holds {size} tensors per microbatch claimed")
        if self.share.dtype != torch.float32 or tensor_digest(self.share) != claim.share:
            raise EvidenceError("the share is not the one claimed")
        if weights_digest(self.weights) != claim.weights:
            raise EvidenceError("the weights are not the ones claimed")
        for index, work in enumerate(claim.works):
            group = self.tensors[index * size : (index + 1) * size]
            if [tensor_digest(tensor) for tensor in group] != _signed(work, first, last):
                raise EvidenceError(f"microbatch {index}'s tensors are not the ones claimed")
        return claim

    def load_into(self, trainer: StageTrainer, claim: ShareClaim) -> None:
        """Gives a fresh stage of the claim's blocks the weights the claim names.

        Raises:
            EvidenceError: they are not that stage's weights.
        """
        if len(self.weights) != len(trainer.params):
            raise EvidenceError("the weights are not the claimed stage's")
        try:
            trainer.load_state([weight.float() for weight in self.weights], claim.step)
        except StageError as exc:
            raise EvidenceError(f"the weights are not the claimed stage's: {exc}") from None

    def distances(
        self, trainer: StageTrainer, ends: ModelEnds, claim: ShareClaim
    ) -> dict[str, float]:
        """How far each of the claimed answers is from a recomputation with `trainer`
        (which holds the claimed weights) (`judge.distances`).

        Raises:
            EvidenceError: the claimed inputs are not ones the stage takes.
            UndecidableError: the recomputation is not finite.
        """
        first, last = self.job.ends_of(claim.stage)
        losses = [work.loss for work in claim.works] if last else None
        try:
            found = judge.distances(
                trainer, ends, first=first, last=last, received=self.share,
                tensors=self.tensors, losses=losses,
                embed=lambda tensor: judge.stage_input(ends, tensor, first=first),
            )  # fmt: skip
        except StageError as exc:
            raise EvidenceError(f"the claimed inputs are not the stage's: {exc}") from None
        if any(math.isnan(distance) for distance in found.values()):
            raise UndecidableError("the recomputation is not finite")
        return found


def is_wrong(distances: dict[str, float]) -> bool:
    return max(distances.values()) > judge.TOLERANCE


def _signed(work: WorkClaim, first: bool, last: bool) -> list[bytes | None]:
    """The digests a microbatch's claim names, in the evidence's tensor order."""
    digests = [work.given, work.second]
    if not last:
        digests.append(work.output)
    if not first:
        digests.append(work.grad_in)
    return digests


def from_verify(
    job: TrainingJob,
    signed: SignedClaim,
    share: torch.Tensor,
    weights: list[torch.Tensor],
    tensors: list[torch.Tensor],
) -> TrainingEvidence | None:
    """A validator's evidence, from the share it got and the microbatches the driver
    sent it to verify (`judge` order, any order of microbatches), with its own weights;
    None where they are not all the claim covers or the weights are other than the
    claimed ones (nothing a stranger could check)."""
    try:
        claim = signed.check()
    except CommitmentError:
        return None
    if claim.stage >= len(job.stages):
        return None
    first, last = job.ends_of(claim.stage)
    size = judge.tensors_per_work(first=first, last=last)
    groups = {}
    for at in range(0, len(tensors) - size + 1, size):
        group = tensors[at : at + size]
        groups[tuple(tensor_digest(tensor) for tensor in group)] = group
    ordered = []
    for work in claim.works:
        group = groups.get(tuple(_signed(work, first, last)))
        if group is None:
            return None
        ordered.extend(group)
    if weights_digest(weights) != claim.weights:
        return None
    return TrainingEvidence(job, signed, share, weights, ordered)
