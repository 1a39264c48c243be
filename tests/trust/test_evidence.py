"""Evidence from a stranger, parsed within bounds: junk, bombs and non-finite tensors are
refused quickly and for the right reason (the accuser's fault, or over this peer's
limits); a client accuses only what the evidence proves beyond any judge's doubt; and a
server's log stays within what evidence may hold."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest
import torch
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.client.verification import ACCUSE_FACTOR, is_proof
from volunteer.transport.commitment import CommitmentError, PeerSigner, SignedCertificate
from volunteer.transport.framing import pack_tensor
from volunteer.trust import step_log
from volunteer.trust.evidence import (
    MAX_EVIDENCE_BYTES,
    MAX_EVIDENCE_STEPS,
    Evidence,
    EvidenceError,
    EvidenceLimitError,
    UndecidableError,
    is_wrong,
)
from volunteer.trust.step_log import StepLog
from volunteer.trust.tolerance import FLOAT32_TOLERANCE

PEER = PeerSigner(RSAPrivateKey())
HIDDEN = 8


def _logged(outputs: list[torch.Tensor]) -> StepLog:
    """A session of one-position steps answered with `outputs`, signed and logged."""
    signer = PEER.open_session(client="c", session_id="s", start=0, end=2)
    log = StepLog(signer.certificate, server=PEER.peer_id, session_id="s", start=0, end=2)
    for position, output in enumerate(outputs):
        hidden, packed = torch.randn(1, 1, HIDDEN), pack_tensor(output)
        log.follow(position, hidden, packed, *signer.step(position, hidden, packed))
    return log


def test_evidence_round_trips_and_holds() -> None:
    outputs = [torch.randn(1, 1, HIDDEN) for _ in range(3)]
    evidence = Evidence.from_bytes(_logged(outputs).evidence().to_bytes())
    assert evidence.checked_certificate().server == PEER.peer_id
    assert torch.equal(evidence.claimed_output(), outputs[-1])


@pytest.mark.parametrize(
    "raw",
    [
        b"\x91" * 100_000 + b"\x90",  # arrays nested 100,000 deep
        b"\xdc\xff\xff" + b"\x90" * 65535,  # 65,535 empty arrays in one
        b"\xdd\x7f\xff\xff\xff" + b"\x90" * 100,  # an array claiming 2**31 items
        msgpack.packb({"v": 1, "starts": [{}] * 3}),
        msgpack.packb({"v": 2}),
        b"\xc1junk",
    ],
)
def test_malformed_evidence_is_refused_at_once(raw: bytes) -> None:
    began = time.perf_counter()
    with pytest.raises(EvidenceError):
        Evidence.from_bytes(raw)
    assert time.perf_counter() - began < 1.0


def test_evidence_over_the_limits_is_not_judged_rather_than_refuted() -> None:
    with pytest.raises(EvidenceLimitError):
        Evidence.from_bytes(b"\x00" * (MAX_EVIDENCE_BYTES + 1))
    with pytest.raises(EvidenceError):  # more steps than a list may hold: not evidence
        Evidence.from_bytes(msgpack.packb({"v": 1, "starts": [0] * (MAX_EVIDENCE_STEPS + 1)}))


def test_non_finite_inputs_or_outputs_decide_nothing() -> None:
    evidence = _logged([torch.randn(1, 1, HIDDEN)]).evidence()
    raw = evidence.to_bytes()
    evidence.steps[0].hidden = torch.full((1, 1, HIDDEN), float("nan"))
    with pytest.raises(EvidenceError, match="not finite"):
        Evidence.from_bytes(evidence.to_bytes())
    nan_answer = _logged([torch.full((1, 1, HIDDEN), float("inf"))]).evidence()
    with pytest.raises(UndecidableError):
        nan_answer.claimed_output()

    async def overflowing(start: int, end: int, steps: list) -> torch.Tensor:
        return torch.full((1, 1, HIDDEN), float("nan"))

    with pytest.raises(UndecidableError, match="not finite"):
        asyncio.run(is_wrong(Evidence.from_bytes(raw), overflowing, FLOAT32_TOLERANCE))


def test_only_a_clearly_wrong_and_exactly_signed_output_is_accused() -> None:
    right = torch.randn(1, 1, HIDDEN)
    evidence = _logged([right]).evidence()
    claimed = evidence.claimed_output()
    noise = torch.randn(1, 1, HIDDEN)
    noise *= right.norm() / noise.norm()
    verdict_far = claimed + 2 * ACCUSE_FACTOR * FLOAT32_TOLERANCE * noise
    verdict_near = claimed + 2 * FLOAT32_TOLERANCE * noise  # wrong, but not beyond doubt
    assert is_proof(evidence, claimed, verdict_far, FLOAT32_TOLERANCE)
    assert not is_proof(evidence, claimed, verdict_near, FLOAT32_TOLERANCE)
    # The signed step is not the output found wrong (a shadow split the step).
    assert not is_proof(evidence, claimed + 1.0, verdict_far, FLOAT32_TOLERANCE)
    assert not is_proof(None, claimed, verdict_far, FLOAT32_TOLERANCE)


def test_a_certificate_dated_far_from_now_is_refused() -> None:
    signer = PEER.open_session(client="c", session_id="s", start=0, end=2)
    body = msgpack.unpackb(signer.certificate.body)
    for issued_s in (time.time() - 3600, time.time() + 3600):
        dated = msgpack.packb({**body, "issued_s": issued_s}, use_bin_type=True)
        certificate = SignedCertificate(dated, PEER.sign(dated))
        with pytest.raises(CommitmentError, match="dated far from now"):
            StepLog(certificate, server=PEER.peer_id, session_id="s", start=0, end=2)


def test_a_log_past_the_evidence_limits_follows_on_but_proves_nothing(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(step_log, "MAX_EVIDENCE_STEPS", 3)
    log = _logged([torch.randn(1, 1, HIDDEN) for _ in range(5)])
    assert log.evidence() is None and log.steps is None
