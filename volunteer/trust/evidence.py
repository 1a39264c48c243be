"""Evidence that a server computed a step wrong, which anyone can check.

A client keeps, for each server session, the steps it sent and the chain the server
signed over them (`StepLog`, fed by the inference stream at every reply). When a check
finds a step wrong, `StepLog.evidence` holds all a stranger needs to convict the
server without asking it anything: the session certificate (signed by the server's
peer key), every step's position and input, the earlier outputs' digests, the claimed
output and the session key's signature of the chain through that step.

`checked_certificate` proves the server signed exactly these steps; `replay` recomputes
them (on any computation of the same blocks) and `is_wrong` compares the claimed
output with the recomputed one within the dtype's tolerance
(`volunteer.trust.tolerance`).

Evidence travels as msgpack bytes named by their sha256 (`to_bytes` / `from_bytes`,
bounded: see `MAX_EVIDENCE_BYTES`); no pickle.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Awaitable, Callable

import msgpack
import torch
from hivemind.proto import runtime_pb2

from volunteer.errors import VolunteerError
from volunteer.transport import framing
from volunteer.transport.commitment import (
    Certificate,
    CommitmentError,
    SignedCertificate,
    chain_start,
    check_step_signature,
    next_chain,
    tensor_digest,
)
from volunteer.transport.protocol import BadRequestError
from volunteer.trust.tolerance import first_mismatch

MAX_EVIDENCE_BYTES = 64 << 20
"""A session's inputs: thousands of positions of a large model's hidden states."""
MAX_EVIDENCE_STEPS = 16_384
MAX_EVIDENCE_ELEMENTS = 1 << 24
"""Elements of any one tensor of evidence (hidden states of thousands of positions)."""
_VERSION = 1


class EvidenceError(VolunteerError):
    """Evidence that is malformed or not signed by the accused: its accuser's fault."""


class EvidenceLimitError(VolunteerError):
    """Evidence over this peer's limits (too large, too old): not judged here."""


class UndecidableError(VolunteerError):
    """The recomputation gives no finite output to compare with: nobody is judged."""


class CannotRecomputeError(VolunteerError):
    """This peer cannot compute the accused blocks (too large to load just to check)."""


@dataclasses.dataclass
class Step:
    start_pos: int
    hidden: torch.Tensor
    """The step's input, as the client sent it (or as the previous server pushed it)."""
    output_digest: bytes


@dataclasses.dataclass
class Evidence:
    certificate: SignedCertificate
    steps: list[Step]
    """Every step of the session up to the accused one, in order."""
    output: runtime_pb2.Tensor
    """The accused step's output, as the server sent it."""
    signature: bytes
    """The session key's signature of the chain through the accused step."""

    def checked_certificate(self) -> Certificate:
        """The certificate, once the chain over these steps is the one its server signed.

        Raises:
            EvidenceError: the certificate or a signature does not hold, or the steps
                are not those the chain covers.
        """
        try:
            certificate = self.certificate.check()
            if not self.steps or self.steps[-1].output_digest != tensor_digest(self.output):
                raise CommitmentError("the claimed output is not the last step's")
            chain = chain_start(self.certificate)
            for step in self.steps:
                chain = next_chain(chain, step.start_pos, step.hidden, step.output_digest)
            check_step_signature(certificate, chain, self.signature)
        except CommitmentError as exc:
            raise EvidenceError(f"the evidence does not hold: {exc}") from None
        return certificate

    def claimed_output(self) -> torch.Tensor:
        last = self.steps[-1].hidden
        try:
            output = framing.unpack_tensor(self.output, max_numel=last.numel(), name="output")
        except BadRequestError as exc:
            raise EvidenceError(f"the claimed output is malformed: {exc}") from None
        if output.shape != last.shape or output.dtype != last.dtype:
            raise EvidenceError("the claimed output is not of its input's shape and dtype")
        if not torch.isfinite(output).all():
            # A client fails such a reply over before any check: no honest accusation.
            raise UndecidableError("the claimed output is not finite")
        return output

    def to_bytes(self) -> bytes:
        return msgpack.packb(
            {
                "v": _VERSION,
                "certificate": self.certificate.body,
                "certificate_signature": self.certificate.signature,
                "starts": [step.start_pos for step in self.steps],
                "inputs": [framing.pack_tensor(s.hidden).SerializeToString() for s in self.steps],
                "digests": [step.output_digest for step in self.steps],
                "output": self.output.SerializeToString(),
                "signature": self.signature,
            },
            use_bin_type=True,
        )

    @classmethod
    def from_bytes(cls, raw: bytes) -> Evidence:
        """Parses evidence from a peer (checked for shape only: see `checked_certificate`).

        Raises:
            EvidenceError: not evidence of this version.
            EvidenceLimitError: over this peer's limits.
        """
        if len(raw) > MAX_EVIDENCE_BYTES:
            raise EvidenceLimitError(f"evidence of {len(raw)} bytes exceeds {MAX_EVIDENCE_BYTES}")
        try:
            value = msgpack.unpackb(
                raw,
                raw=False,
                strict_map_key=True,
                max_array_len=MAX_EVIDENCE_STEPS,
                max_map_len=16,
                max_str_len=64,
                max_ext_len=0,
                # Flat lists of scalars only: nested containers, each one byte on the wire,
                # would build millions of objects from a few MiB.
                list_hook=_flat,
                object_hook=_flat_map,
            )
            if not isinstance(value, dict) or value.get("v") != _VERSION:
                raise EvidenceError("not evidence of a version this peer reads")
            starts, inputs, digests = value["starts"], value["inputs"], value["digests"]
            if not len(starts) == len(inputs) == len(digests):
                raise EvidenceError("the evidence's step lists differ in length")
            steps = [
                Step(_position(start), _tensor(raw_input), _digest(digest))
                for start, raw_input, digest in zip(starts, inputs, digests, strict=True)
            ]
            output = runtime_pb2.Tensor.FromString(_bytes(value["output"]))
            certificate = SignedCertificate(
                _bytes(value["certificate"]), _bytes(value["certificate_signature"])
            )
            return cls(certificate, steps, output, _bytes(value["signature"]))
        except (EvidenceError, EvidenceLimitError):
            raise
        except Exception as exc:  # msgpack, protobuf and lookups raise many types on junk
            raise EvidenceError(f"malformed evidence ({type(exc).__name__})") from None


def evidence_id(raw: bytes) -> str:
    """The name of evidence bytes: their sha256 in hex."""
    return hashlib.sha256(raw).hexdigest()


Replay = Callable[[int, int, list[tuple[int, torch.Tensor]]], Awaitable[torch.Tensor]]
"""Runs the steps (start_pos, hidden) in order through a fresh computation of blocks
[start, end) and returns the last step's output."""


async def is_wrong(evidence: Evidence, replay: Replay, tolerance: float) -> bool:
    """Whether the accused step's claimed output differs from a recomputation of the
    session's steps (call `checked_certificate` first: it proves the claim is the
    server's).

    Raises:
        EvidenceError: the claimed output is malformed.
        UndecidableError: the claimed output or the recomputation is not finite.
        Whatever `replay` raises (no computation of these blocks).
    """
    certificate = evidence.certificate.check()
    claimed = evidence.claimed_output()
    steps = [(step.start_pos, step.hidden) for step in evidence.steps]
    expected = await replay(certificate.start, certificate.end, steps)
    if not torch.isfinite(expected).all():
        raise UndecidableError("the recomputation is not finite: the inputs overflow the blocks")
    return first_mismatch(claimed, expected.to(claimed.dtype), tolerance) is not None


def _position(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 31:
        raise EvidenceError(f"bad step position {value!r}")
    return value


def _bytes(value: object) -> bytes:
    if not isinstance(value, bytes):
        raise EvidenceError(f"expected bytes, got {type(value).__name__}")
    return value


def _digest(value: object) -> bytes:
    digest = _bytes(value)
    if len(digest) != 32:
        raise EvidenceError("a step's output digest is not 32 bytes")
    return digest


def _tensor(raw: object) -> torch.Tensor:
    proto = runtime_pb2.Tensor.FromString(_bytes(raw))
    if math.prod(proto.size) > MAX_EVIDENCE_ELEMENTS:
        raise EvidenceLimitError(f"a step's input of shape {list(proto.size)} is over the limit")
    try:
        tensor = framing.unpack_tensor(proto, max_numel=MAX_EVIDENCE_ELEMENTS, name="input")
    except BadRequestError as exc:
        raise EvidenceError(f"a step's input is malformed: {exc}") from None
    if tensor.dim() != 3 or min(tensor.shape) < 1:
        raise EvidenceError(f"a step's input must be [B, S, H], got {list(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise EvidenceError("a step's input is not finite: no server takes such a step")
    return tensor.detach()


def _flat(items: list) -> list:
    if any(isinstance(item, (list, dict)) for item in items):
        raise EvidenceError("nested lists are no part of evidence")
    return items


def _flat_map(value: dict) -> dict:
    if any(isinstance(item, dict) for item in value.values()):
        raise EvidenceError("nested maps are no part of evidence")
    return value
