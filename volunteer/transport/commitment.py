"""What a server signs of its inference steps, so that a wrong output is provably its own.

When it admits a session, a server draws a session key (Ed25519) and signs, with its
peer key (the RSA key behind its libp2p peer id), a certificate naming itself, the
client, the session, the blocks and the session key. Each step's reply then carries the
session's running hash (the chain) over every step so far and the session key's
signature of it::

    chain_0 = sha256("volunteer-chain-v1" | certificate)
    chain_k = sha256(chain_{k-1} | sha256(start_pos_k | digest(input_k) | digest(output_k)))

The peer key signs once per session (an RSA signature costs a fraction of a
millisecond); each step costs two hashes and an Ed25519 signature, tens of
microseconds. A client checks every reply's chain against the inputs it sent and the
outputs it got, so it always holds a signed chain it agrees with: a step found wrong
later is then evidence that anyone can check with the certificate alone, without
asking the server (see `volunteer.trust.evidence`).

Digests are over a tensor as `framing.pack_tensor` writes it (dtype, shape, the raw
bytes), whichever way it travelled.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import time
from typing import Any

import msgpack
import torch
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa
from hivemind.p2p import PeerID
from hivemind.proto import crypto_pb2, runtime_pb2
from hivemind.utils.crypto import RSAPrivateKey, RSAPublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from volunteer.errors import VolunteerError

_CHAIN_START = b"volunteer-chain-v1"
_STEP_SIGNED = b"volunteer-step-v1"
MAX_CERTIFICATE_BYTES = 2048
MAX_RSA_KEY_BYTES = 1024
"""A DER RSA public key: 2048 bits take 294 bytes, 4096 bits 550."""
LARGE_STEP_ELEMENTS = 1 << 20
"""A step whose tensors are hashed off the event loop (4 MiB of float32 and up)."""
_SHA2_256_MULTIHASH_PREFIX = b"\x12\x20"
"""libp2p peer id of an RSA key: multihash(sha2-256 code 0x12, 32-byte digest)."""


class CommitmentError(VolunteerError):
    """A certificate, chain or signature does not hold up."""


class Certificate(BaseModel):
    """What a server's peer key vouches for: the session key of one session."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    server: str = Field(min_length=1, max_length=128)
    client: str = Field(min_length=1, max_length=128)
    session_id: str = Field(min_length=1, max_length=128)
    start: int = Field(ge=0)
    end: int = Field(ge=1)
    session_key: bytes = Field(min_length=32, max_length=32)
    """The raw Ed25519 public key that signs the session's chain."""
    server_key: bytes = Field(min_length=1, max_length=MAX_RSA_KEY_BYTES)
    """The server's RSA public key (DER): its peer id is this key's hash."""
    dtype: str = Field(default="float32", max_length=16)
    """What the server says it computes in: shown, never trusted (a check's tolerance
    is the checker's own, or a cheat would claim half precision to hide its errors)."""
    issued_s: float = 0.0
    """When the server opened the session (wall clock): a client refuses a certificate
    far from its own time, and a judge evidence too old (`volunteer.trust.evidence`)."""


@dataclasses.dataclass(frozen=True)
class SignedCertificate:
    body: bytes
    """The `Certificate` as msgpack: signed and hashed as these bytes."""
    signature: bytes

    def check(self) -> Certificate:
        """The certificate, once its signature is the named server's.

        Raises:
            CommitmentError: too large, malformed, its key is not the server's peer id,
                or the signature does not match.
        """
        if len(self.body) > MAX_CERTIFICATE_BYTES or len(self.signature) > MAX_RSA_KEY_BYTES:
            raise CommitmentError("the session certificate is too large")
        try:
            value = msgpack.unpackb(self.body, raw=False, strict_map_key=True)
            certificate = Certificate.model_validate(value)
        except (ValueError, TypeError, msgpack.UnpackException, ValidationError) as exc:
            raise CommitmentError(f"malformed session certificate ({type(exc).__name__})") from None
        check_peer_signature(
            certificate.server_key,
            certificate.server,
            self.body,
            self.signature,
            "session certificate",
        )
        return certificate


def check_peer_signature(
    der_public_key: bytes, peer_id: str, body: bytes, signature: bytes, what: str
) -> None:
    """Raises CommitmentError unless `der_public_key` is an RSA-2048+ key whose peer id is
    `peer_id` and `signature` is its signature of `body` (`what` names the signed thing
    in the error)."""
    public = _rsa_key(der_public_key, what)
    if rsa_peer_id(der_public_key) != peer_id:
        raise CommitmentError(f"the {what}'s key is not its signer's peer id")
    if not public.verify(body, signature):
        raise CommitmentError(f"the {what}'s signature does not match")


@functools.lru_cache(maxsize=4096)
def _loaded_key(der_public_key: bytes) -> RSAPublicKey | None:
    # Loading a key costs more than a hash: a client signs many receipts with one.
    try:
        public = serialization.load_der_public_key(der_public_key)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return None
    if not isinstance(public, rsa.RSAPublicKey) or public.key_size < 2048:
        return None
    return RSAPublicKey(public)


def _rsa_key(der_public_key: bytes, what: str) -> RSAPublicKey:
    if len(der_public_key) > MAX_RSA_KEY_BYTES:
        raise CommitmentError(f"the {what}'s key is too large")
    public = _loaded_key(der_public_key)
    if public is None:
        raise CommitmentError(f"the {what}'s key is not an RSA-2048+ key")
    return public


@functools.lru_cache(maxsize=4096)
def rsa_peer_id(der_public_key: bytes) -> str:
    """The base58 libp2p peer id of an RSA public key in DER (SubjectPublicKeyInfo): the
    derivation of libp2p (and hivemind's `PeerID.from_identity`) for RSA keys."""
    message = crypto_pb2.PublicKey(key_type=crypto_pb2.KeyType.RSA, data=der_public_key)
    digest = hashlib.sha256(message.SerializeToString()).digest()
    return PeerID(_SHA2_256_MULTIHASH_PREFIX + digest).to_base58()


def tensor_digest(tensor: runtime_pb2.Tensor | torch.Tensor) -> bytes:
    """sha256 of a tensor's dtype, shape and bytes as `framing.pack_tensor` writes them
    (a torch tensor is hashed in place, without packing it)."""
    if isinstance(tensor, runtime_pb2.Tensor):
        dtype, shape, data = tensor.dtype, list(tensor.size), tensor.buffer
    else:
        dtype, shape = str(tensor.dtype).removeprefix("torch."), list(tensor.shape)
        flat = tensor.detach().cpu().contiguous()
        data = (flat.view(torch.int16) if flat.dtype == torch.bfloat16 else flat).numpy()
    digest = hashlib.sha256(f"{dtype}:{shape}:".encode())
    digest.update(data)
    return digest.digest()


def step_digest(start_pos: int, input_digest: bytes, output_digest: bytes) -> bytes:
    return hashlib.sha256(start_pos.to_bytes(8, "big") + input_digest + output_digest).digest()


def chain_start(certificate: SignedCertificate) -> bytes:
    return hashlib.sha256(_CHAIN_START + certificate.body).digest()


def next_chain(
    chain: bytes, start_pos: int, hidden: runtime_pb2.Tensor | torch.Tensor, output_digest: bytes
) -> bytes:
    """The chain after one more step: at `start_pos`, on `hidden`, answering the output
    whose `tensor_digest` is `output_digest`."""
    step = step_digest(start_pos, tensor_digest(hidden), output_digest)
    return hashlib.sha256(chain + step).digest()


def check_step_signature(certificate: Certificate, chain: bytes, signature: bytes) -> None:
    """Raises CommitmentError unless `signature` is the session key's, of `chain`."""
    try:
        key = ed25519.Ed25519PublicKey.from_public_bytes(certificate.session_key)
        key.verify(signature, _STEP_SIGNED + chain)
    except (InvalidSignature, ValueError):
        raise CommitmentError("a step's signature does not match its chain") from None


class PeerSigner:
    """A server's peer key, for certifying its sessions' keys."""

    def __init__(self, identity: RSAPrivateKey) -> None:
        self._identity = identity
        public = serialization.load_ssh_public_key(identity.get_public_key().to_bytes())
        self.public_der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        self.peer_id = rsa_peer_id(self.public_der)

    def open_session(self, **certified: Any) -> SessionSigner:
        """The signer of a session: `certified` holds the `Certificate`'s fields but the
        server's own (client, session_id, start, end, dtype)."""
        return SessionSigner(self, **certified)

    def sign(self, data: bytes) -> bytes:
        return self._identity.sign(data)


class SessionSigner:
    """A server's side of one session: its certificate and running chain."""

    def __init__(self, peer: PeerSigner, **certified: Any) -> None:
        self._key = ed25519.Ed25519PrivateKey.generate()
        session_key = self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        body = msgpack.packb(
            Certificate(
                server=peer.peer_id,
                session_key=session_key,
                server_key=peer.public_der,
                issued_s=time.time(),
                **certified,
            ).model_dump(),
            use_bin_type=True,
        )
        self.certificate = SignedCertificate(body, peer.sign(body))
        self.chain = chain_start(self.certificate)

    def step(
        self, start_pos: int, hidden: torch.Tensor, output: runtime_pb2.Tensor
    ) -> tuple[bytes, bytes]:
        """Adds a step to the chain: the new chain and its signature."""
        self.chain = next_chain(self.chain, start_pos, hidden, tensor_digest(output))
        return self.chain, self._key.sign(_STEP_SIGNED + self.chain)
