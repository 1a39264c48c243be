"""Accusations with evidence in training (`volunteer.training.claims`, `.evidence`): a
validator that finds a peer's share or answers wrong hands over evidence that a
stranger, holding only the job's model, checks and recomputes; evidence of honest work
convicts nobody, and evidence that was tampered with does not hold."""

from __future__ import annotations

import asyncio

import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from tests.server import sub_span
from tests.training.swarm_helpers import (
    signed_last_stage_work,
    start_swarm,
    tiny_data,
    tiny_job,
    tiny_model,
)
from volunteer.training.claims import sign_claim
from volunteer.training.evidence import TrainingEvidence, from_verify, is_wrong
from volunteer.training.job import Aggregation, TrainingJob
from volunteer.training.stage import StageTrainer
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.evidence import MAX_EVIDENCE_BYTES, EvidenceError, EvidenceLimitError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated")


def _stranger_verdict(full, ends, job: TrainingJob, raw: bytes) -> tuple[str, dict]:  # type: ignore[no-untyped-def]
    """What a peer outside the job finds of evidence bytes: whom they accuse, and the
    distances it recomputes on a fresh stage of the model's blocks."""
    evidence = TrainingEvidence.from_bytes(raw)
    claim = evidence.checked()
    start, end = evidence.job.stages[claim.stage]
    trainer = StageTrainer(
        sub_span(full, start, end), job.optimizer, lora_rank=job.lora_rank or 0, seed=job.seed
    )
    evidence.load_into(trainer, claim)
    return claim.peer, evidence.distances(trainer, ends, claim)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("attacker", "fault", "lora_rank"),
    [
        (4, "sign-flip", None),
        (0, "wrong-activations", None),
        (3, "wrong-input-grads", None),
        (1, "sign-flip", 2),
    ],
)
def test_a_validator_accuses_the_attacker_with_evidence_a_stranger_convicts_on(
    attacker: int, fault: str, lora_rank: int | None
) -> None:
    full, ends = tiny_model()
    data = tiny_data(ends.config.vocab_size, rows=24, sequence=8)
    job = tiny_job(data, aggregation=Aggregation(kind="mean"), steps=2, lora_rank=lora_rank)
    filed: list[tuple[str, TrainingEvidence, str]] = []

    async def run() -> list[str]:
        swarm = await start_swarm(
            full, ends, job, data, stages=[0, 0, 0, 1, 1, 1], faults={attacker: fault},
            on_accuse=lambda *accusation: filed.append(accusation), checks=2,
        )  # fmt: skip
        try:
            for _ in range(job.steps):
                await swarm.driver.run_step()
            return [peer.peer_id for peer in swarm.peers]
        finally:
            await swarm.close()

    peer_ids = asyncio.run(run())
    assert filed, "no validator accused the attacker"
    for accused, evidence, reason in filed:
        assert accused == peer_ids[attacker] and "wrong" in reason
        who, distances = _stranger_verdict(full, ends, job, evidence.to_bytes())
        assert who == peer_ids[attacker]
        assert is_wrong(distances), distances


def test_honest_work_convicts_nobody_and_tampered_evidence_does_not_hold() -> None:
    full, ends = tiny_model()
    job = tiny_job(tiny_data(ends.config.vocab_size, rows=12, sequence=8),
                   aggregation=Aggregation(kind="mean"))  # fmt: skip
    signer = PeerSigner(RSAPrivateKey())
    honest = signed_last_stage_work(job, full, ends, signer)
    _, distances = _stranger_verdict(full, ends, job, honest.to_bytes())
    assert not is_wrong(distances), distances
    _, distances = _stranger_verdict(
        full, ends, job, signed_last_stage_work(job, full, ends, signer, scale=-1.0).to_bytes()
    )
    assert is_wrong(distances) and distances["share"] > 1.0

    def fails(evidence: TrainingEvidence, words: str) -> None:
        with pytest.raises(EvidenceError, match=words):
            _stranger_verdict(full, ends, job, evidence.to_bytes())

    def altered(**changes: object) -> TrainingEvidence:
        return TrainingEvidence(**{**honest.__dict__, **changes})

    fails(altered(share=honest.share * 2), "share is not the one claimed")
    fails(altered(weights=[w + 1 for w in honest.weights]), "weights are not")
    fails(altered(tensors=[honest.tensors[0] + 1, *honest.tensors[1:]]), "microbatch 0")
    fails(altered(tensors=honest.tensors[:-1]), "3 tensors per microbatch")
    # A claim in the accused's name, signed by another key (the accuser's forgery).
    forged = sign_claim(PeerSigner(RSAPrivateKey()), honest.claim.check())
    fails(altered(claim=forged), "peer id")
    other_job = job.model_copy(update={"steps": 99})
    fails(altered(job=other_job), "not of the evidence's job")
    with pytest.raises(EvidenceError, match="malformed"):
        TrainingEvidence.from_bytes(b"\x93junk")
    with pytest.raises(EvidenceLimitError):
        TrainingEvidence.from_bytes(bytes(MAX_EVIDENCE_BYTES + 1))

    # A validator builds evidence only from every microbatch the claim covers, in any
    # order the driver sent them, and with the weights the claim names.
    swapped = [*honest.tensors[3:], *honest.tensors[:3]]
    built = from_verify(job, honest.claim, honest.share, honest.weights, swapped)
    assert built is not None and built.tensors == honest.tensors
    assert from_verify(job, honest.claim, honest.share, honest.weights, swapped[:3]) is None
    later = [w * 1.01 for w in honest.weights]
    assert from_verify(job, honest.claim, honest.share, later, honest.tensors) is None


def test_a_claim_covers_more_microbatches_than_a_peer_holds_at_once() -> None:
    """A peer that ran thousands of microbatches in a step (a large batch, one sequence
    each) signs them all in one claim, which its stage reads back."""
    from volunteer.training.claims import ClaimLog, ShareClaim
    from volunteer.training.stage import MAX_IN_FLIGHT

    signer = PeerSigner(RSAPrivateKey())
    log = ClaimLog()
    for key in range(MAX_IN_FLIGHT + 500):
        given = torch.full((1, 4), key)
        log.forwarded(str(key), given, given.float())
        log.backwarded(str(key), given.float(), given.float())
    claim = ShareClaim(
        peer=signer.peer_id, job="0" * 16, stage=1, step=0, round=0, weights=bytes(32),
        share=bytes(32), works=tuple(log.works), issued_s=0.0,
    )  # fmt: skip
    assert sign_claim(signer, claim).check() == claim
