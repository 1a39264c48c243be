"""The client's side of credit: it signs a receipt for each server's work and hands it
over (`volunteer.trust.receipts`, `volunteer.trust.credit_exchange.RECEIPT_HANDLE`).

An inference session reports each hop when it ends (`HopWork`: closed, failed over, or
abandoned), with the positions the hop's server ran and how the client's checks of its
steps fared; forward and backward calls are tallied per server, kind and blocks, and
receipted every `CALL_FLUSH_S` and when the client closes. Receipts go out in the
background (at most `MAX_SENDING` at once, each within `SEND_TIMEOUT_S`); a server that
is gone, or refuses one, loses only that receipt. No receipt goes to this peer itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from collections.abc import Callable

import torch
from hivemind.p2p import P2P

from volunteer.scheduler.routing import RouteHop
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.credit_exchange import (
    MAX_ANSWER_BYTES,
    RECEIPT_HANDLE,
    ExchangeError,
    ask,
)
from volunteer.trust.receipts import Kind, Receipt, sign_receipt

SEND_TIMEOUT_S = 10.0
MAX_SENDING = 32
"""Receipts on their way at once; more are dropped (logged), never queued without end."""
CALL_FLUSH_S = 60.0

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class HopWork:
    """What one server did in one hop of an inference session."""

    peer_id: str
    start: int
    end: int
    session_id: str
    tokens: int
    opened_s: float
    checked: int = 0
    failed: int = 0


class ReceiptSender:
    """Signs and sends this client's receipts (see the module)."""

    def __init__(
        self,
        p2p: P2P,
        signer: PeerSigner,
        model: str,
        *,
        is_banned: Callable[[str], bool] = lambda peer: False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`is_banned`: whether this client's checks found the server wrong (its work,
        as a shadow too, is then receipted as failed: it earns nothing)."""
        self._p2p, self._signer, self.model, self._clock = p2p, signer, model, clock
        self._is_banned = is_banned
        self._sending: set[asyncio.Task[None]] = set()
        self._calls: dict[tuple[str, Kind, int, int], int] = {}
        self._calls_since = clock()
        self.sent = self.refused = self.dropped = 0

    def hop_done(self, work: HopWork) -> None:
        """Receipts an inference hop's work (nothing for none, or for our own server)."""
        if work.tokens <= 0 or work.peer_id == self._signer.peer_id:
            return
        failed = max(work.failed, int(self._is_banned(work.peer_id)))
        self._send(
            Receipt(
                model=self.model,
                server=work.peer_id,
                client=self._signer.peer_id,
                session_id=work.session_id,
                kind="inference",
                start=work.start,
                end=work.end,
                tokens=work.tokens,
                opened_s=work.opened_s,
                closed_s=self._clock(),
                checked=work.checked + failed,
                failed=failed,
            )
        )

    def call_done(self, hop: RouteHop, kind: Kind, hidden: torch.Tensor) -> None:
        """Tallies the positions of a forward or backward call, receipted in a while."""
        if hop.peer_id == self._signer.peer_id:
            return
        key = (hop.peer_id, kind, hop.start, hop.end)
        self._calls[key] = self._calls.get(key, 0) + hidden.shape[0] * hidden.shape[1]
        if self._clock() - self._calls_since >= CALL_FLUSH_S:
            self.flush_calls()

    def work_done(
        self, peer_id: str, kind: Kind, start: int, end: int, tokens: int, *, checked: int = 0
    ) -> None:
        """Receipts work of one piece (a training step's passes), sent at once."""
        if tokens <= 0 or peer_id == self._signer.peer_id:
            return
        now = self._clock()
        self._send_tally(peer_id, kind, (start, end), tokens, (now, now), checked=checked)

    def flush_calls(self) -> None:
        """Receipts every call tallied so far."""
        calls, self._calls = self._calls, {}
        opened, self._calls_since = self._calls_since, self._clock()
        for (peer_id, kind, start, end), tokens in calls.items():
            self._send_tally(peer_id, kind, (start, end), tokens, (opened, self._calls_since))

    def _send_tally(
        self,
        peer_id: str,
        kind: Kind,
        blocks: tuple[int, int],
        tokens: int,
        times: tuple[float, float],
        *,
        checked: int = 0,
    ) -> None:
        """Receipts work that has no session of its own (a fresh id names it)."""
        self._send(
            Receipt(
                model=self.model,
                server=peer_id,
                client=self._signer.peer_id,
                session_id=uuid.uuid4().hex,
                kind=kind,
                start=blocks[0],
                end=blocks[1],
                tokens=tokens,
                opened_s=times[0],
                closed_s=times[1],
                checked=checked,
            )
        )

    async def close(self) -> None:
        """Receipts the calls tallied and waits for every receipt on its way."""
        self.flush_calls()
        if self._sending:
            await asyncio.wait(list(self._sending), timeout=SEND_TIMEOUT_S + 1)

    def _send(self, receipt: Receipt) -> None:
        if len(self._sending) >= MAX_SENDING:
            self.dropped += 1
            logger.info("dropped a receipt for %s: too many on their way", receipt.server)
            return
        raw = sign_receipt(self._signer, receipt).to_bytes()
        task = asyncio.get_running_loop().create_task(self._deliver(receipt.server, raw))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _deliver(self, server: str, raw: bytes) -> None:
        try:
            answer = await ask(
                self._p2p,
                server,
                RECEIPT_HANDLE,
                raw,
                max_answer_bytes=MAX_ANSWER_BYTES,
                timeout_s=SEND_TIMEOUT_S,
            )
        except ExchangeError as exc:
            logger.info("a receipt did not reach %s: %s", server, exc)
            return
        if answer:
            self.refused += 1
            reason = answer[:200].decode("utf-8", errors="replace")
            logger.info("%s refused a receipt: %s", server, reason)
        else:
            self.sent += 1
