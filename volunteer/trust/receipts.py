"""Receipts: a client's signed word that a server did some work for it.

When a session with a server ends (an inference session, or the forward and backward
calls a client tallies per server), the client signs a `Receipt` with its peer key (the
RSA key behind its libp2p peer id) and hands it to the server, which keeps it
(`volunteer.trust.ledger`). Credit is counted from receipts only
(`volunteer.scheduler.credit`): a server cannot make one (it holds no client's key), and
one signed by the server's own key is self-dealt and earns nothing.

A receipt travels as msgpack bytes: the body (signed as these bytes), the signature and
the client's public key (DER), bounded by `MAX_RECEIPT_BYTES`; its name is the sha256 of
the body, so the same receipt handed over twice is stored once. `SignedReceipt.check`
proves the body is the named client's.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Literal

import msgpack
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from volunteer.errors import VolunteerError
from volunteer.transport.commitment import (
    MAX_RSA_KEY_BYTES,
    CommitmentError,
    PeerSigner,
    check_peer_signature,
)

Kind = Literal["inference", "forward", "backward", "training"]
MAX_BODY_BYTES = 1024
MAX_RECEIPT_BYTES = MAX_BODY_BYTES + 2 * MAX_RSA_KEY_BYTES + 64
MAX_TOKENS = 1 << 40
CHECKED_KEPT = 8192
"""Receipts whose check is remembered (a few KiB each, with their bytes)."""
_VERSION = 1


class ReceiptError(VolunteerError):
    """A receipt that is malformed, or not signed by the client it names."""


class Receipt(BaseModel):
    """What a client vouches a server did for it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str = Field(min_length=1, max_length=128)
    server: str = Field(min_length=1, max_length=128)
    client: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=128)
    """The server's session (inference), or the client's tally of calls: one receipt
    each."""
    kind: Kind
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    tokens: int = Field(ge=0, le=MAX_TOKENS)
    """Positions the server ran through its blocks for the client (batch x length)."""
    opened_s: float
    closed_s: float
    """When the work began and ended (the client's wall clock)."""
    checked: int = Field(default=0, ge=0, le=MAX_TOKENS)
    """The server's steps (or calls) the client verified..."""
    failed: int = Field(default=0, ge=0, le=MAX_TOKENS)
    """... and of those, found wrong."""

    @field_validator("opened_s", "closed_s")
    @classmethod
    def _finite(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError("must be a finite time")
        return value

    @property
    def blocks(self) -> int:
        return max(0, self.end - self.start)


@dataclasses.dataclass(frozen=True)
class SignedReceipt:
    body: bytes
    signature: bytes
    client_key: bytes
    """The client's RSA public key (DER): its peer id is this key's hash."""

    @property
    def id(self) -> str:
        return hashlib.sha256(self.body).hexdigest()

    def check(self) -> Receipt:
        """The receipt, once its signature is the named client's.

        Raises:
            ReceiptError: too large, malformed, or not signed by the client's key.
        """
        return _checked(self.body, self.signature, self.client_key)

    def to_bytes(self) -> bytes:
        return msgpack.packb([self.body, self.signature, self.client_key], use_bin_type=True)

    @classmethod
    def from_bytes(cls, raw: bytes) -> SignedReceipt:
        """Parses a receipt from a peer (check it with `check`).

        Raises:
            ReceiptError: not three byte strings within the bounds.
        """
        if len(raw) > MAX_RECEIPT_BYTES:
            raise ReceiptError(f"a receipt of {len(raw)} bytes exceeds {MAX_RECEIPT_BYTES}")
        try:
            value = msgpack.unpackb(raw, raw=False, max_array_len=3, max_map_len=0)
        except Exception as exc:  # msgpack raises many types on junk
            raise ReceiptError(f"malformed receipt ({type(exc).__name__})") from None
        if not (isinstance(value, list) and len(value) == 3):
            raise ReceiptError("a receipt is [body, signature, key]")
        if not all(isinstance(part, bytes) for part in value):
            raise ReceiptError("a receipt's parts are byte strings")
        return cls(*value)


def sign_receipt(signer: PeerSigner, receipt: Receipt) -> SignedReceipt:
    """`receipt`, signed by the client `signer` (which must be `receipt.client`)."""
    if receipt.client != signer.peer_id:
        raise ValueError("a client signs receipts in its own name only")
    body = msgpack.packb({"v": _VERSION, **receipt.model_dump()}, use_bin_type=True)
    return SignedReceipt(body, signer.sign(body), signer.public_der)


def forget_checked_receipts() -> None:
    """Forgets which receipts were checked (benchmarks time cold checks)."""
    _checked.cache_clear()


@functools.lru_cache(maxsize=CHECKED_KEPT)
def _checked(body: bytes, signature: bytes, client_key: bytes) -> Receipt:
    # Kept by its bytes: an auditor meets a receipt again in later summaries and draws,
    # and a signature check costs what a hundred hashes do. Failures are not kept.
    if len(body) > MAX_BODY_BYTES or len(signature) > MAX_RSA_KEY_BYTES:
        raise ReceiptError("the receipt is too large")
    try:
        value = msgpack.unpackb(body, raw=False, strict_map_key=True)
        if not isinstance(value, dict) or value.pop("v", None) != _VERSION:
            raise ReceiptError("not a receipt of a version this peer reads")
        receipt = Receipt.model_validate(value)
    except ReceiptError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException, ValidationError) as exc:
        raise ReceiptError(f"malformed receipt ({type(exc).__name__})") from None
    try:
        check_peer_signature(client_key, receipt.client, body, signature, "receipt")
    except CommitmentError as exc:
        raise ReceiptError(str(exc)) from None
    return receipt
