"""What a stage peer signs of its work in a step, so that a wrong share or answer is
provably its own, to anyone.

With each share it sends its stage, a peer signs (with its peer key, the RSA key behind
its libp2p id) a `ShareClaim`: the job, stage, step and round; the digest of the weights
it computed with; the share's digest; and, for each microbatch in the share, the digests
of what it was given (its input, and the gradient w.r.t. its output or the targets) and
of what it answered (its output, its input's gradient, its loss). A peer keeps them as
it works (`ClaimLog`) and signs once per share.

A stage peer refuses a share without a claim that holds. A validator that finds the
share or an answer wrong then holds, with the tensors the driver sent it and its own
weights, everything a stranger needs to recompute the step and convict the peer
(`volunteer.training.evidence`): the peer said, under its key, that these inputs at
these weights gave these answers.

Digests are `transport.commitment.tensor_digest` (dtype, shape and bytes), so they do
not depend on how a tensor travelled.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math

import msgpack
import pydantic
import torch

from volunteer.training.job import MAX_BATCH
from volunteer.transport.commitment import (
    MAX_RSA_KEY_BYTES,
    CommitmentError,
    PeerSigner,
    check_peer_signature,
    tensor_digest,
)

MAX_CLAIM_WORKS = MAX_BATCH
"""Microbatches one claim covers: a whole step's, of one sequence each, at most."""
MAX_CLAIM_BYTES = MAX_CLAIM_WORKS * 200 + 1024
"""About 180 bytes a microbatch (four digests, a loss and their names)."""
_SIGNED = b"volunteer-share-claim-v1"


class WorkClaim(pydantic.BaseModel):
    """One microbatch of a share: what the peer was given and what it answered."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    given: bytes = pydantic.Field(min_length=32, max_length=32)
    second: bytes = pydantic.Field(min_length=32, max_length=32)
    """The gradient w.r.t. its output (the targets, on the last stage)."""
    output: bytes | None = pydantic.Field(default=None, min_length=32, max_length=32)
    """Not on the last stage, which answers a loss instead."""
    grad_in: bytes | None = pydantic.Field(default=None, min_length=32, max_length=32)
    """Not on the first stage, which sends no gradient back."""
    loss: float | None = pydantic.Field(default=None, allow_inf_nan=False)


class ShareClaim(pydantic.BaseModel):
    """A peer's signed word on one share it sent (module doc)."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    peer: str = pydantic.Field(min_length=1, max_length=128)
    job: str = pydantic.Field(pattern=r"^[0-9a-f]{16}$")
    stage: int = pydantic.Field(ge=0)
    step: int = pydantic.Field(ge=0)
    round: int = pydantic.Field(ge=0)
    weights: bytes = pydantic.Field(min_length=32, max_length=32)
    """`weights_digest` of the trained parameters the peer computed with."""
    share: bytes = pydantic.Field(min_length=32, max_length=32)
    works: tuple[WorkClaim, ...] = pydantic.Field(min_length=1, max_length=MAX_CLAIM_WORKS)
    issued_s: float = pydantic.Field(allow_inf_nan=False)


@dataclasses.dataclass(frozen=True)
class SignedClaim:
    body: bytes
    """The `ShareClaim` as msgpack: signed and hashed as these bytes."""
    signature: bytes
    key: bytes
    """The signer's RSA public key (DER): its peer id is this key's hash."""

    def check(self) -> ShareClaim:
        """The claim, once its signature is the named peer's.

        Raises:
            CommitmentError: too large, malformed, or not signed by the peer it names.
        """
        if len(self.body) > MAX_CLAIM_BYTES or len(self.signature) > MAX_RSA_KEY_BYTES:
            raise CommitmentError("the share claim is too large")
        try:
            value = msgpack.unpackb(
                self.body, raw=False, strict_map_key=True, max_array_len=MAX_CLAIM_WORKS
            )
            claim = ShareClaim.model_validate(value)
        except (ValueError, TypeError, msgpack.UnpackException) as exc:
            raise CommitmentError(f"malformed share claim ({type(exc).__name__})") from None
        signed = _SIGNED + self.body
        check_peer_signature(self.key, claim.peer, signed, self.signature, "share claim")
        return claim

    def to_header(self) -> dict[str, bytes]:
        return {"claim": self.body, "signature": self.signature, "key": self.key}

    @classmethod
    def from_header(cls, header: dict[str, object]) -> SignedClaim:
        """The signed claim a message's header carries (checked by `check` only).

        Raises:
            CommitmentError: the header carries none.
        """
        parts = [header.get(name) for name in ("claim", "signature", "key")]
        if not all(isinstance(part, bytes) for part in parts):
            raise CommitmentError("a share travels with its signed claim")
        return cls(*parts)  # type: ignore[arg-type]


def sign_claim(signer: PeerSigner, claim: ShareClaim) -> SignedClaim:
    body = msgpack.packb(claim.model_dump(), use_bin_type=True)
    return SignedClaim(body, signer.sign(_SIGNED + body), signer.public_der)


def weights_digest(params: list[torch.Tensor]) -> bytes:
    """One digest of a stage's trained parameters, in order."""
    digest = hashlib.sha256(b"volunteer-weights-v1")
    for param in params:
        digest.update(tensor_digest(param.detach()))
    return digest.digest()


class ClaimLog:
    """What a peer was given and answered for each microbatch of this step, as it works:
    the works of a share, in the order their backward ran."""

    def __init__(self) -> None:
        self._forwarded: dict[str, tuple[bytes, bytes | None]] = {}
        self.works: list[WorkClaim] = []

    def forwarded(self, key: str, given: torch.Tensor, output: torch.Tensor | None) -> None:
        self._forwarded[key] = (
            tensor_digest(given),
            None if output is None else tensor_digest(output),
        )

    def backwarded(
        self,
        key: str,
        second: torch.Tensor,
        grad_in: torch.Tensor | None,
        loss: float | None = None,
    ) -> None:
        forwarded = self._forwarded.pop(key, None)
        if forwarded is None:  # the stage ran no forward of it: nothing to claim
            raise ValueError(f"no forward of microbatch {key!r} was logged")
        given, output = forwarded
        self.works.append(
            WorkClaim(
                given=given,
                second=tensor_digest(second),
                output=output,
                grad_in=None if grad_in is None else tensor_digest(grad_in),
                loss=None if loss is None or not math.isfinite(loss) else loss,
            )
        )

    def clear(self) -> None:
        self._forwarded.clear()
        self.works.clear()
