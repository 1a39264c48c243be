"""Receipts: signed by their client only; a server keeps one only for work it did for
that client, once (forged, edited, replayed and self-dealt receipts earn nothing)."""

from __future__ import annotations

import time
from pathlib import Path

import msgpack
import pytest
from hivemind.utils.crypto import RSAPrivateKey
from volunteer.scheduler.credit import counted

from volunteer.server.work_log import WorkLog
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.intake import take_receipt
from volunteer.trust.ledger import Ledger
from volunteer.trust.receipts import Receipt, ReceiptError, SignedReceipt, sign_receipt

CLIENT, SERVER, OTHER = (PeerSigner(RSAPrivateKey()) for _ in range(3))
MODEL = "smollm2"


def _receipt(client: PeerSigner = CLIENT, **changes: object) -> Receipt:
    now = time.time()
    fields: dict[str, object] = dict(
        model=MODEL, server=SERVER.peer_id, client=client.peer_id, session_id="s1",
        kind="inference", start=0, end=15, tokens=40, opened_s=now - 5, closed_s=now,
    )  # fmt: skip
    return Receipt.model_validate({**fields, **changes})


def _ledger(path: Path | None = None) -> Ledger:
    return Ledger(path, server=SERVER.peer_id, model=MODEL, params_per_block=1_000_000)


def _served(tokens: int = 40, peer: str = CLIENT.peer_id, session: str = "s1") -> WorkLog:
    log = WorkLog()
    log.add(peer, "inference", session, tokens)
    return log


def test_a_receipt_holds_only_with_its_clients_signature() -> None:
    signed = sign_receipt(CLIENT, _receipt())
    assert SignedReceipt.from_bytes(signed.to_bytes()).check() == _receipt().model_copy(
        update={"closed_s": signed.check().closed_s, "opened_s": signed.check().opened_s}
    )
    with pytest.raises(ValueError, match="own name"):
        sign_receipt(OTHER, _receipt())  # a client signs for itself only
    stolen = SignedReceipt(signed.body, OTHER.sign(signed.body), OTHER.public_der)
    with pytest.raises(ReceiptError, match="not its signer's peer id"):
        stolen.check()  # another key over the client's name
    edited = msgpack.unpackb(signed.body)
    edited["tokens"] = 4000
    forged = SignedReceipt(msgpack.packb(edited), signed.signature, signed.client_key)
    with pytest.raises(ReceiptError, match="signature does not match"):
        forged.check()
    for junk in (b"", b"\x93\x01\x02\x03", b"x" * 5000):
        with pytest.raises(ReceiptError):
            SignedReceipt.from_bytes(junk).check()


def test_the_server_keeps_a_receipt_for_work_it_did_once_and_refuses_the_rest() -> None:
    ledger, log = _ledger(), _served(40)
    good = sign_receipt(CLIENT, _receipt()).to_bytes()
    assert take_receipt(ledger, log.claim, peer=OTHER.peer_id, body=good).startswith("not its")
    assert take_receipt(ledger, log.claim, peer=CLIENT.peer_id, body=good) == ""
    assert take_receipt(ledger, log.claim, peer=CLIENT.peer_id, body=good).startswith("replayed")
    again = sign_receipt(CLIENT, _receipt(tokens=10)).to_bytes()  # the same session, re-signed
    assert take_receipt(ledger, log.claim, peer=CLIENT.peer_id, body=again).startswith("replayed")
    assert len(ledger) == 1 and ledger.served(SignedReceipt.from_bytes(good).id) == 40


def test_inflated_foreign_and_self_dealt_receipts_earn_nothing() -> None:
    ledger, log = _ledger(), _served(40)

    def take(signer: PeerSigner, **changes: object) -> str:
        body = sign_receipt(signer, _receipt(signer, **changes)).to_bytes()
        return take_receipt(ledger, log.claim, peer=signer.peer_id, body=body)

    assert take(CLIENT, tokens=41).startswith("unearned")  # more than served
    assert take(CLIENT, session_id="never").startswith("unearned")
    assert take(CLIENT, server=OTHER.peer_id).startswith("for another")
    assert take(CLIENT, model="other").startswith("for another")
    log.add(SERVER.peer_id, "inference", "s1", 40)
    assert take(SERVER).startswith("self-dealt")
    assert take(OTHER).startswith("unearned")  # a stranger has no work logged here
    assert len(ledger) == 0
    assert counted(ledger.works(), server=SERVER.peer_id, params_per_block=10**6) == []


def test_calls_are_claimed_in_parts_and_local_link_work_by_its_session() -> None:
    log = WorkLog()
    log.add(CLIENT.peer_id, "forward", "", 100)
    assert log.claim(CLIENT.peer_id, "forward", "any-id", 60) == 100
    assert log.claim(CLIENT.peer_id, "forward", "other-id", 41) is None
    assert log.claim(CLIENT.peer_id, "forward", "other-id", 40) == 40
    log.add("local", "inference", "s9", 12)  # a client of this machine, over its socket
    assert log.claim(CLIENT.peer_id, "inference", "s9", 12) == 12
    assert log.claim(CLIENT.peer_id, "inference", "s9", 12) is None


def test_receipts_survive_a_restart(tmp_path: Path) -> None:
    ledger = _ledger(tmp_path / "receipts.sqlite")
    body = sign_receipt(CLIENT, _receipt()).to_bytes()
    assert take_receipt(ledger, _served().claim, peer=CLIENT.peer_id, body=body) == ""
    ledger.close()
    reopened = _ledger(tmp_path / "receipts.sqlite")
    assert len(reopened) == 1
    assert reopened.signed(SignedReceipt.from_bytes(body).id) == SignedReceipt.from_bytes(body)
    assert reopened.has_session(CLIENT.peer_id, "s1", "inference")
    assert (tmp_path / "receipts.sqlite").stat().st_mode & 0o777 == 0o600
