"""Auditing a server's credit summary (`volunteer.trust.credit_summary`).

An auditor first looks at the summary alone (`first_look`): its time, its sums, and the
receipts it shows, each of which must be signed by its client, name this server and
model, and not be self-dealt. Then it draws `DRAWS` random points on the root's
weight (`draw_weights`: credit, recent credit and checks passed weigh alike) and asks the
server for the receipts they fall on (`PROOF_HANDLE`); each answer must lead to the
summary's root and hold a receipt that earns the leaf's amounts (`check_proven`). Credit
that no receipt backs is found by a draw with the share of the weight it claims; the
draws are the auditor's own, so the server cannot choose which receipts it shows, and
every new summary is drawn on again.

Any finding drops the summary: the board keeps what the auditor last found true of the
server, if anything.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from hivemind.p2p import P2P

from volunteer.scheduler.credit import CLIENT_DAY_CAP, MILLI, decayed_milli, raw_milli
from volunteer.trust.credit_exchange import (
    MAX_PROOF_ANSWER_BYTES,
    PROOF_HANDLE,
    Proven,
    ask,
    pack_draws,
    unpack_proofs,
)
from volunteer.trust.credit_summary import Summary
from volunteer.trust.credit_tree import (
    CREDIT,
    PASSED,
    RECENT,
    SUMS,
    Coefficients,
    ProofError,
    check_proof,
    weight,
)
from volunteer.trust.receipts import Receipt, ReceiptError, SignedReceipt

DRAWS = 1
"""Points drawn per summary: each new summary of a server is drawn on again, by every
auditor, and one proven lie costs the server its standing (see `Finding`), so a draw
per summary deters as well as many would, at a signature check each."""
CHECKS_SHARE_INVERSE = 4
"""Checks passed weigh a fifth of a draw's weight (credit and recent credit the rest)."""
CLOCK_SLACK_S = 600.0
PROOF_TIMEOUT_S = 15.0


@dataclasses.dataclass(frozen=True)
class Finding:
    """What an audit found wrong with a summary."""

    reason: str
    is_proof: bool = True
    """Whether the server's own signed words prove the lie (its summary, stored under its
    key, or a path from that summary's root): its summary is dropped and its standing
    lost. Otherwise (a clock far off, an answer that proves nothing) the summary is only
    dropped."""


def first_look(
    peer: str,
    summary: Summary,
    *,
    model: str,
    now_s: float,
    is_banned: Callable[[str], bool] = lambda peer: False,
) -> Finding | None:
    """What is wrong with the summary on its face, its shown receipts' signatures and
    their clients' standing here included (None: nothing)."""
    credit, recent, _ = summary.sums
    if summary.model != model:
        return Finding("a summary of another model", is_proof=False)
    if summary.as_of_s > now_s + CLOCK_SLACK_S:
        return Finding("a summary dated in the future", is_proof=False)
    if recent > credit:
        return Finding("more recent credit than credit")
    if summary.receipts == 0 and (any(summary.sums) or any(summary.root)):
        return Finding("credit without receipts")
    if len(summary.sample) > summary.receipts:
        return Finding("more receipts shown than counted")
    for raw in summary.sample:
        try:
            receipt = SignedReceipt.from_bytes(raw).check()
        except ReceiptError as exc:
            return Finding(f"a shown receipt does not hold: {exc}")
        foreign = _foreign(peer, summary, receipt, "a shown receipt")
        if foreign is not None:
            return foreign
        if is_banned(receipt.client):
            # Bans are each peer's own: the server may not know of this one.
            return Finding("a shown receipt is from a client banned here", is_proof=False)
    return None


def draw_weights(sums: tuple[int, ...]) -> Coefficients:
    """What each amount weighs in a draw: credit and recent credit one each (milli-credits),
    and checks passed a fifth of the weight together (inflated checks only speed a
    release from escrow; inflated credit is what a draw must find)."""
    weights = [0] * SUMS
    weights[CREDIT] = weights[RECENT] = 1
    if sums[PASSED] > 0:
        credit = sums[CREDIT] + sums[RECENT]
        weights[PASSED] = max(1, credit // (CHECKS_SHARE_INVERSE * sums[PASSED]))
    return tuple(weights)


def draw_points(summary: Summary, rng: random.Random) -> list[int]:
    """`DRAWS` random points on the root's weight (none on a weightless root)."""
    total = weight(summary.sums, draw_weights(summary.sums))
    return [rng.randrange(total) for _ in range(DRAWS)] if total > 0 else []


def check_proven(
    peer: str,
    summary: Summary,
    draws: list[int],
    proven: list[Proven],
    *,
    params_per_block: int,
    is_banned: Callable[[str], bool] = lambda peer: False,
) -> Finding | None:
    """What is wrong with the server's answer to `draws` (None: it holds); credit from a
    client banned here drops the summary (not proof: the server may not know)."""
    if len(proven) != len(draws):
        return Finding(f"answered {len(proven)} of {len(draws)} draws", is_proof=False)
    weights = draw_weights(summary.sums)
    for point, (leaf, path, raw) in zip(draws, proven, strict=True):
        try:
            check_proof(
                leaf, path, root=summary.root, sums=summary.sums, coefficients=weights, point=point
            )
        except ProofError as exc:
            return Finding(f"a draw's answer proves nothing: {exc}", is_proof=False)
        # From here on the leaf is proven part of the summary the server signed.
        try:
            signed = SignedReceipt.from_bytes(raw)
            receipt = signed.check()
        except ReceiptError as exc:
            return Finding(f"a drawn receipt does not hold: {exc}")
        if bytes.fromhex(signed.id) != leaf.receipt_id:
            return Finding("a drawn leaf is not the receipt sent with it")
        foreign = _foreign(peer, summary, receipt, "a drawn receipt")
        if foreign is not None:
            return foreign
        problem = _overpaid(peer, summary, receipt, leaf.sums, params_per_block)
        if problem is not None:
            return Finding(f"a drawn receipt is {problem}")
        if leaf.sums[CREDIT] > 0 and is_banned(receipt.client):
            return Finding("credit from a client banned here", is_proof=False)
    return None


async def audit(
    p2p: P2P,
    peer: str,
    summary: Summary,
    *,
    params_per_block: int,
    rng: random.Random,
    is_banned: Callable[[str], bool] = lambda peer: False,
    timeout_s: float = PROOF_TIMEOUT_S,
) -> Finding | None:
    """Draws points on the summary and checks the server's proofs; what is wrong (None:
    nothing). Raises ExchangeError when the server does not answer."""
    draws = draw_points(summary, rng)
    if not draws:
        return None
    body = pack_draws(summary.root, draw_weights(summary.sums), draws)
    answer = await ask(
        p2p, peer, PROOF_HANDLE, body, max_answer_bytes=MAX_PROOF_ANSWER_BYTES, timeout_s=timeout_s
    )
    proven = unpack_proofs(answer)
    return check_proven(
        peer, summary, draws, proven, params_per_block=params_per_block, is_banned=is_banned
    )


def _foreign(peer: str, summary: Summary, receipt: Receipt, what: str) -> Finding | None:
    if receipt.server != peer:
        return Finding(f"{what} is for another server")
    if receipt.model != summary.model:
        return Finding(f"{what} is for another model")
    if receipt.closed_s > summary.as_of_s + CLOCK_SLACK_S:
        # The client's clock dates a receipt: it may be the one that is off.
        return Finding(f"{what} is dated after the summary", is_proof=False)
    return None


def _overpaid(
    peer: str, summary: Summary, receipt: Receipt, sums: tuple[int, ...], params_per_block: int
) -> str | None:
    credit, recent, passed = sums
    earns = raw_milli(
        blocks=receipt.blocks,
        tokens=receipt.tokens,
        kind=receipt.kind,
        params_per_block=params_per_block,
    )
    if receipt.client == peer or receipt.failed > 0:
        earns = 0
    if credit > min(earns, int(CLIENT_DAY_CAP * MILLI)):
        return f"counted at {credit} milli-credits, more than it earns ({earns})"
    if recent != decayed_milli(credit, receipt.closed_s, summary.as_of_s):
        return "counted with a recent credit that is not its credit decayed"
    checks = 0 if receipt.client == peer else max(0, receipt.checked - receipt.failed)
    if passed != checks:
        return f"counted with {passed} checks passed, not the {checks} it reports"
    return None
