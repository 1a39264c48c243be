"""A client's record of one server session's signed steps (see
`volunteer.transport.commitment`), kept so that a step a check finds wrong is evidence
(`volunteer.trust.evidence`).

Every reply is checked as it comes: its chain must be the chain over the step as the
client sent it and the output as the client got it, signed by the session's key. A
server whose reply does not fit is failed at once (its output is not used), so the log
always holds a chain the client agrees with.

The log keeps each step's input (a reference to the tensor the client holds anyway for
replays) and its output's digest: a session's evidence is its inputs, bounded by the
session's length and rewinds.
"""

from __future__ import annotations

import time

import torch
from hivemind.proto import runtime_pb2

from volunteer.transport.commitment import (
    Certificate,
    CommitmentError,
    SignedCertificate,
    chain_start,
    check_step_signature,
    next_chain,
    tensor_digest,
)
from volunteer.trust.evidence import MAX_EVIDENCE_BYTES, MAX_EVIDENCE_STEPS, Evidence, Step

CLOCK_SLACK_S = 600.0
"""How far a certificate's date may be from this peer's clock (honest clocks drift)."""
MAX_LOGGED_ELEMENTS = MAX_EVIDENCE_BYTES // 8
"""Input elements a log keeps: its evidence (4 bytes an element, twice for framing)
then stays within what a judge fetches."""


class StepLog:
    """The signed steps of one server session, as this client checked them."""

    def __init__(
        self, certificate: SignedCertificate, *, server: str, session_id: str, start: int, end: int
    ) -> None:
        """Raises:
        CommitmentError: the certificate is not the server's, or not of this session."""
        checked = certificate.check()
        expected = (server, session_id, start, end)
        if (checked.server, checked.session_id, checked.start, checked.end) != expected:
            raise CommitmentError("the session certificate names another server, session or span")
        if abs(checked.issued_s - time.time()) > CLOCK_SLACK_S:
            raise CommitmentError("the session certificate is dated far from now")
        self.certificate = certificate
        self._checked: Certificate = checked
        self._chain = chain_start(certificate)
        self.steps: list[Step] | None = []
        """None once past the evidence's limits: the chain is still followed, and the
        session can no longer be proven wrong (only caught and banned here)."""
        self._elements = 0
        self._last_output: runtime_pb2.Tensor | None = None
        self._last_signature = b""

    def follow(
        self,
        start_pos: int,
        hidden: torch.Tensor,
        output: runtime_pb2.Tensor,
        chain: bytes | None,
        signature: bytes | None,
    ) -> None:
        """Adds a step, once its reply's commitment is over exactly this step.

        Raises:
            CommitmentError: no commitment, one over another step, or a bad signature.
        """
        if chain is None or signature is None:
            raise CommitmentError("the reply commits to nothing (no chain or signature)")
        output_digest = tensor_digest(output)
        expected = next_chain(self._chain, start_pos, hidden, output_digest)
        if chain != expected:
            raise CommitmentError("the reply's chain is not over the step as sent and answered")
        check_step_signature(self._checked, chain, signature)
        self._chain = chain
        self._last_output, self._last_signature = output, signature
        if self.steps is None:
            return
        self._elements += hidden.numel()
        if len(self.steps) >= MAX_EVIDENCE_STEPS or self._elements > MAX_LOGGED_ELEMENTS:
            self.steps = None  # bounded memory; a longer session proves nothing
            return
        self.steps.append(Step(start_pos, hidden, output_digest))

    def evidence(self) -> Evidence | None:
        """The evidence of the last step (None before any)."""
        if self._last_output is None or self.steps is None:
            return None
        return Evidence(self.certificate, list(self.steps), self._last_output, self._last_signature)
