"""Auditing credit summaries: an honest summary holds; one that claims more than its
receipts support, or shows a forged receipt, is found out."""

from __future__ import annotations

import dataclasses
import os
import random
import time

import pytest
from hivemind.utils.crypto import RSAPrivateKey

from volunteer.server.work_log import WorkLog
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.credit_audit import (
    Finding,
    check_proven,
    draw_points,
    draw_weights,
    first_look,
)
from volunteer.trust.credit_exchange import pack_proofs, unpack_proofs
from volunteer.trust.credit_summary import Summary, summary_of
from volunteer.trust.credit_tree import CREDIT, Leaf, SumTree, check_proof, weight
from volunteer.trust.intake import take_receipt
from volunteer.trust.ledger import Built, Ledger, proof_at
from volunteer.trust.receipts import Receipt, SignedReceipt, sign_receipt

SERVER = PeerSigner(RSAPrivateKey())
CLIENTS = [PeerSigner(RSAPrivateKey()) for _ in range(2)]
MODEL, PARAMS = "smollm2", 1_000_000


def _ledger(receipts: int = 6) -> Ledger:
    ledger = Ledger(None, server=SERVER.peer_id, model=MODEL, params_per_block=PARAMS)
    now = time.time()
    for n in range(receipts):
        client = CLIENTS[n % 2]
        session = f"s{n}"
        log = WorkLog()
        log.add(client.peer_id, "inference", session, 100 + n)
        receipt = Receipt(
            model=MODEL, server=SERVER.peer_id, client=client.peer_id, session_id=session,
            kind="inference", start=0, end=15, tokens=100 + n, opened_s=now - 60,
            closed_s=now - 50 + n, checked=3, failed=0,
        )  # fmt: skip
        body = sign_receipt(client, receipt).to_bytes()
        assert take_receipt(ledger, log.claim, peer=client.peer_id, body=body) == ""
    return ledger


def _summary(ledger: Ledger, built: Built, **changes: object) -> Summary:
    return Summary.model_validate({**summary_of(ledger, built).model_dump(), **changes})


def _answer(ledger: Ledger, built: Built, weights: tuple, draws: list[int]) -> list:
    proven = []
    for point in draws:
        # A server claiming more than its tree holds answers with what it has.
        leaf, path = proof_at(built, weights, min(point, weight(built.tree.sums, weights) - 1))
        signed = ledger.signed(leaf.receipt_id.hex())
        proven.append((leaf, path, signed.to_bytes() if signed else b""))
    return unpack_proofs(pack_proofs(proven))  # as the wire carries it


def _audit(ledger: Ledger, built: Built, summary: Summary, seed: int = 0) -> Finding | None:
    problem = first_look(SERVER.peer_id, summary, model=MODEL, now_s=time.time())
    if problem is not None:
        return problem
    draws = draw_points(summary, random.Random(seed))
    proven = _answer(ledger, built, draw_weights(summary.sums), draws)
    return check_proven(SERVER.peer_id, summary, draws, proven, params_per_block=PARAMS)


def test_the_sum_tree_proves_every_point_to_its_leaf() -> None:
    rng = random.Random(1)
    for size in (1, 2, 3, 7, 16, 33):
        leaves = [
            Leaf(os.urandom(32), tuple(rng.randrange(9) for _ in range(3))) for _ in range(size)
        ]
        tree = SumTree(leaves)
        for weights in ((1, 0, 0), (1, 1, 3)):
            for point in range(weight(tree.sums, weights)):
                index = tree.index_at(weights, point)
                check_proof(leaves[index], tree.prove(index), root=tree.root, sums=tree.sums,
                            coefficients=weights, point=point)  # fmt: skip


def test_an_honest_summary_passes_every_draw() -> None:
    ledger = _ledger()
    built = ledger.build(time.time(), is_banned=lambda peer: False)
    summary = _summary(ledger, built)
    assert summary.sums[CREDIT] > 0 and summary.clients == 2
    for seed in range(20):
        assert _audit(ledger, built, summary, seed) is None


def test_a_summary_claiming_more_than_its_root_is_dropped() -> None:
    ledger = _ledger()
    built = ledger.build(time.time(), is_banned=lambda peer: False)
    inflated = tuple(value * 10 for value in built.tree.sums)
    found = _audit(ledger, built, _summary(ledger, built, sums=inflated))
    # Its answer proves nothing: dropped, not proof of a lie (a stale tree looks the same).
    assert found is not None and "does not lead to the summary's root" in found.reason
    assert not found.is_proof


def test_a_tree_with_an_inflated_leaf_or_an_unbacked_one_is_dropped() -> None:
    ledger = _ledger(receipts=1)
    honest = ledger.build(time.time(), is_banned=lambda peer: False)
    (leaf,) = honest.tree.leaves
    credit, recent, passed = leaf.sums
    cases = (
        ([Leaf(leaf.receipt_id, (credit * 100, recent * 100, passed))], 1.0),  # overpaid
        ([leaf, Leaf(os.urandom(32), (credit * 99, recent * 99, 0))], 0.7),  # unbacked credit
        # Checks claimed with no credit: a fifth of a draw's weight.
        ([leaf, Leaf(os.urandom(32), (0, 0, 1000))], 0.1),
    )
    for leaves, share in cases:
        built = dataclasses.replace(honest, tree=SumTree(leaves))
        found = [_audit(ledger, built, _summary(ledger, built), seed) for seed in range(40)]
        caught = [each for each in found if each is not None]
        assert len(caught) >= share * len(found), (leaves, found)
        assert all(each.is_proof for each in caught)  # a path from its own root: proof


def test_a_summary_showing_a_forged_or_foreign_receipt_is_dropped() -> None:
    ledger = _ledger()
    built = ledger.build(time.time(), is_banned=lambda peer: False)
    real = SignedReceipt.from_bytes(_summary(ledger, built).sample[0])
    other = CLIENTS[1] if real.check().client == CLIENTS[0].peer_id else CLIENTS[0]
    forged = SignedReceipt(real.body, other.sign(real.body), other.public_der).to_bytes()
    assert "does not hold" in str(_audit(ledger, built, _summary(ledger, built, sample=[forged])))
    assert "more recent credit" in str(
        _audit(ledger, built, _summary(ledger, built, sums=(1, 2, 0)))
    )
    future = _summary(ledger, built, as_of_s=time.time() + 86_400)
    assert "future" in str(_audit(ledger, built, future))


@pytest.mark.parametrize("junk", [b"", b"\x91\x01", b"\x91\x94\xc4\x01x\x90\x90\x05"])
def test_malformed_proofs_are_refused_not_crashed_on(junk: bytes) -> None:
    from volunteer.trust.credit_exchange import ExchangeError

    with pytest.raises(ExchangeError):
        unpack_proofs(junk)


def test_credit_from_a_client_banned_here_drops_the_summary_but_proves_nothing() -> None:
    ledger = _ledger()
    built = ledger.build(time.time(), is_banned=lambda peer: False)
    summary = _summary(ledger, built)
    banned = {CLIENTS[0].peer_id, CLIENTS[1].peer_id}.__contains__
    look = first_look(SERVER.peer_id, summary, model=MODEL, now_s=time.time(), is_banned=banned)
    assert look is not None and "banned here" in look.reason and not look.is_proof
    draws = draw_points(summary, random.Random(0))
    proven = _answer(ledger, built, draw_weights(summary.sums), draws)
    found = check_proven(
        SERVER.peer_id, summary, draws, proven, params_per_block=PARAMS, is_banned=banned
    )
    assert found is not None and "banned here" in found.reason and not found.is_proof
