"""What a server takes of a receipt handed to it (`volunteer.trust.receipts`).

A receipt is kept only when it is signed by the client that hands it over, names this
server and model, is not the server's own (self-dealt), is the first for its session,
and claims no more work than the server logged for that client (`claim`: the server's
own count of the session or calls, `volunteer.server.work_log`). Anything else is
refused with the reason, and earns nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from volunteer.trust.ledger import Ledger
from volunteer.trust.receipts import ReceiptError, SignedReceipt

Claim = Callable[[str, str, str, int], "int | None"]
"""(peer, kind, session id, tokens) -> the tokens logged (taken from the log), or None
where the log holds less."""


def take_receipt(ledger: Ledger, claim: Claim, *, peer: str, body: bytes) -> str:
    """Keeps the receipt in `body` from `peer`; why it was refused ("": kept).

    Raises:
        LedgerError: the receipts file cannot be written.
    """
    try:
        signed = SignedReceipt.from_bytes(body)
        receipt = signed.check()
    except ReceiptError as exc:
        return f"malformed: {exc}"
    if receipt.client != peer:
        return "not its client's: a receipt comes from the client that signs it"
    if receipt.server != ledger.server or receipt.model != ledger.model:
        return "for another server or model"
    if receipt.client == ledger.server:
        return "self-dealt: a server earns nothing from its own key"
    if ledger.has_session(receipt.client, receipt.session_id, receipt.kind):
        return "replayed: this session has its receipt"
    served = claim(peer, receipt.kind, receipt.session_id, receipt.tokens)
    if served is None:
        return "unearned: more work than this server did for its client"
    ledger.add(signed, receipt, served=served)
    return ""
