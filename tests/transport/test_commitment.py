"""A server's commitments: the certificate binds a session key to the server's peer id,
each step's signature binds the chain over every step so far, and a client's log takes a
reply only when its chain is over the step as it was sent and answered."""

from __future__ import annotations

import msgpack
import pytest
import torch
from hivemind.p2p import PeerID
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.swarm.dht_records import encode_p2p_identity
from volunteer.transport.commitment import (
    CommitmentError,
    PeerSigner,
    SignedCertificate,
    check_step_signature,
    tensor_digest,
)
from volunteer.transport.framing import pack_tensor
from volunteer.trust.step_log import StepLog

KEY = RSAPrivateKey()
OTHER_KEY = RSAPrivateKey()


def _session(key: RSAPrivateKey = KEY, **changes: object):
    fields = {"client": "client", "session_id": "s1", "start": 2, "end": 4, "dtype": "float32"}
    return PeerSigner(key).open_session(**{**fields, **changes})


def _log(signer, **changes: object) -> StepLog:
    expected = {"server": PeerSigner(KEY).peer_id, "session_id": "s1", "start": 2, "end": 4}
    return StepLog(signer.certificate, **{**expected, **changes})


def test_the_certified_key_is_the_servers_peer_id() -> None:
    signer = PeerSigner(KEY)
    assert signer.peer_id == PeerID.from_identity(encode_p2p_identity(KEY)).to_base58()
    certificate = _session().certificate.check()
    assert (certificate.server, certificate.start, certificate.end) == (signer.peer_id, 2, 4)


def test_a_certificate_naming_another_server_or_signed_by_another_key_is_refused() -> None:
    body = msgpack.unpackb(_session().certificate.body)
    forged = {**body, "server": PeerSigner(OTHER_KEY).peer_id}
    packed = msgpack.packb(forged, use_bin_type=True)
    with pytest.raises(CommitmentError, match="not its signer's peer id"):
        SignedCertificate(packed, KEY.sign(packed)).check()
    other = _session(OTHER_KEY).certificate
    with pytest.raises(CommitmentError, match="signature does not match"):
        SignedCertificate(other.body, _session().certificate.signature).check()
    with pytest.raises(CommitmentError, match="malformed"):
        SignedCertificate(b"\x93junk", b"").check()
    with pytest.raises(CommitmentError, match="too large"):
        SignedCertificate(b"x" * 4096, b"").check()


def test_the_log_takes_replies_over_the_step_as_sent_and_answered() -> None:
    signer = _session()
    log = _log(signer)
    hidden, output = torch.randn(1, 3, 8), pack_tensor(torch.randn(1, 3, 8))
    log.follow(0, hidden, output, *signer.step(0, hidden, output))
    assert len(log.steps) == 1
    assert tensor_digest(hidden) == tensor_digest(pack_tensor(hidden))

    step = torch.randn(1, 1, 8)
    answered, claimed = pack_tensor(torch.randn(1, 1, 8)), pack_tensor(torch.randn(1, 1, 8))
    chain, signature = signer.step(3, step, answered)
    with pytest.raises(CommitmentError, match="not over the step"):
        log.follow(3, step, claimed, chain, signature)  # signed one output, sent another
    with pytest.raises(CommitmentError, match="not over the step"):
        log.follow(4, step, answered, chain, signature)  # another position than sent
    with pytest.raises(CommitmentError, match="commits to nothing"):
        log.follow(3, step, answered, None, None)
    with pytest.raises(CommitmentError, match="signature does not match"):
        log.follow(3, step, answered, chain, bytes(64))
    log.follow(3, step, answered, chain, signature)
    assert len(log.steps) == 2


def test_a_step_signature_is_of_its_session_key_only() -> None:
    first, second = _session(), _session()
    hidden, output = torch.randn(1, 1, 8), pack_tensor(torch.randn(1, 1, 8))
    chain, signature = first.step(0, hidden, output)
    check_step_signature(first.certificate.check(), chain, signature)
    with pytest.raises(CommitmentError):
        check_step_signature(second.certificate.check(), chain, signature)


def test_a_log_refuses_a_certificate_of_another_session_or_span() -> None:
    with pytest.raises(CommitmentError, match="another server, session or span"):
        _log(_session(session_id="s2"))
    with pytest.raises(CommitmentError, match="another server, session or span"):
        _log(_session(start=0))
    with pytest.raises(CommitmentError, match="another server, session or span"):
        _log(_session(OTHER_KEY))
