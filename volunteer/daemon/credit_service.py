"""A daemon's part in credit: it keeps its receipts, publishes its summary, and audits
everyone's into the leaderboard it shows.

- **Receipts in.** A client hands over a receipt (`RECEIPT_HANDLE`) for work this server
  did for it: it must be signed by the client that sends it, name this server and
  model, not be this daemon's own, and claim no more than the server's own log of that
  session or those calls (`volunteer.server.work_log`). Kept once (`Ledger`).
- **Summary out.** At most every `MIN_PUBLISH_S` after a new receipt, and every
  `PUBLISH_S` anyway, the daemon counts its receipts, builds their sum tree and
  publishes the summary with its latest receipts (`volunteer.trust.credit_summary`);
  it answers auditors' draws on the trees it published (`PROOF_HANDLE`).
- **Audits.** Every `AUDIT_S` (longer for a board past `READ_PER_ROUND`) it reads every
  summary of the model and audits the ones it has not seen (`volunteer.trust.
  credit_audit`, at most `MAX_AUDITS` a round, `AUDITS_AT_ONCE` servers asked at once);
  those that hold up make the board (`volunteer.trust.board`), ranked by recent
  average credit once out of escrow (`volunteer.scheduler.credit`), its own checks'
  bans forfeiting a held escrow. A summary its server's own signed words prove false
  also counts as a failed check of that server here, and bans it.

Files that cannot be opened (a full disk, another program's file) are logged and
replaced by records in memory for the run: the daemon keeps serving.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable

from volunteer.client.receipt_sender import ReceiptSender
from volunteer.control.messages import (
    LEADERBOARD,
    BoardRow,
    CreditStatus,
    LeaderboardReply,
    NoParams,
)
from volunteer.control.server import ControlServer
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.credit_board import board_rows, credit_standing, params_per_block
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.trust_service import TrustService
from volunteer.model_cache.served_model import open_model
from volunteer.paths import Paths
from volunteer.settings import Settings
from volunteer.transport.commitment import PeerSigner
from volunteer.trust.board import Board, BoardStoreError
from volunteer.trust.credit_audit import audit, first_look
from volunteer.trust.credit_exchange import (
    MAX_DRAWS,
    PROOF_HANDLE,
    RECEIPT_HANDLE,
    ExchangeError,
    pack_proofs,
    serve,
    unpack_draws,
)
from volunteer.trust.credit_summary import Summary, publish_on_node, read_on_node, summary_of
from volunteer.trust.credit_tree import weight
from volunteer.trust.intake import take_receipt
from volunteer.trust.ledger import Built, Ledger, LedgerError, proof_at
from volunteer.trust.receipts import MAX_RECEIPT_BYTES

PUBLISH_S = 300.0
MIN_PUBLISH_S = 10.0
AUDIT_S = 10.0
READ_PER_ROUND = 500
"""Summaries read per `AUDIT_S`: a larger board is read that much less often."""
QUIET_DOUBLINGS = 1
"""A round that finds no new summary doubles the wait, up to twice `AUDIT_S` (so a new
summary is audited within a publish and two rounds, about half a minute)."""
MAX_AUDITS = 512
"""Summaries audited per round (the rest wait for the next: a flood of keys slows its
own audits)."""
AUDITS_AT_ONCE = 16
"""Servers asked for proofs at once (each answer is checked as it comes)."""
DHT_TIMEOUT_S = 10.0
KEPT_TREES = 3
"""Published trees kept to answer draws on (an auditor may draw on the one before)."""
HISTORY_DAYS = 30
OPEN_RETRY_S = 60.0

logger = logging.getLogger(__name__)


def audit_period_s(audit_s: float, summaries: int, quiet_rounds: int) -> float:
    """The wait before the next round: `audit_s`, longer for a board past
    `READ_PER_ROUND` summaries (every read checks each one's signature), and doubled for
    each quiet round before (a swarm whose credit does not change is read less often)."""
    return audit_s * max(1.0, summaries / READ_PER_ROUND) * 2 ** min(quiet_rounds, QUIET_DOUBLINGS)


class CreditService:
    """Receipts, summary and board of one daemon (see the module)."""

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        dht: DHTService,
        blocks: BlockService,
        trust: TrustService,
        *,
        signer: PeerSigner,
        owner: bytes,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        audit_s: float = AUDIT_S,
    ) -> None:
        self._settings, self._paths, self._dht = settings, paths, dht
        self._blocks, self._trust, self._signer, self._owner = blocks, trust, signer, owner
        self._clock, self._rng, self.audit_s = clock, rng or random.Random(), audit_s
        self.ledger: Ledger | None = None
        self.board = Board()
        self.model = ""
        self.params_per_block = 0
        self._trees: collections.OrderedDict[bytes, Built] = collections.OrderedDict()
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._started_s = clock()
        self._read_last = 0
        self._quiet = 0
        """Rounds in a row that found no new summary."""
        self.refused = 0
        """Receipts refused since start."""

    @property
    def peer_id(self) -> str:
        return self._signer.peer_id

    def receipt_sender(self, model: str) -> ReceiptSender:
        """A sender of this daemon's receipts as a client of `model` (for its chats)."""
        return ReceiptSender(
            self._dht.p2p,
            self._signer,
            model,
            is_banned=lambda peer: self._trust.reputation.is_banned(peer),
        )

    async def start(self) -> None:
        p2p = self._dht.p2p
        await p2p.add_binary_stream_handler(
            RECEIPT_HANDLE, serve(self._receive, max_request_bytes=MAX_RECEIPT_BYTES)
        )
        await p2p.add_binary_stream_handler(
            PROOF_HANDLE, serve(self._prove, max_request_bytes=64 + MAX_DRAWS * 24)
        )
        # A daemon serving no blocks may have to fetch the model's files for its config:
        # its start does not wait for that (receipts are refused until then).
        self._tasks = [asyncio.create_task(self._run(), name="credit")]

    async def _run(self) -> None:
        while True:
            try:
                await self._open()
                break
            except Exception as exc:  # a model that cannot be read now: tried again later
                logger.warning("credit: the model's config cannot be read (%s); retrying", exc)
                await asyncio.sleep(OPEN_RETRY_S)
        try:  # its own summary first: the first audit round then finds it
            await self._publish()
        except Exception as exc:  # the publish loop tries again
            logger.warning("publishing the credit summary failed: %s", exc)
        await asyncio.gather(self._publish_forever(), self._audit_forever())

    async def _open(self) -> None:
        served = self._blocks.model
        if served is None:
            served = await asyncio.to_thread(
                open_model, self._settings.model, self._paths.models_dir
            )
        self.params_per_block = params_per_block(served.config)
        data = self._paths.data_dir
        try:
            self.board = await asyncio.to_thread(Board, data / "board.sqlite")
        except BoardStoreError as exc:
            logger.error("%s; this run keeps its board in memory only", exc)
        opened = functools.partial(
            Ledger,
            server=self.peer_id,
            model=served.swarm_name,
            params_per_block=self.params_per_block,
        )
        try:
            self.ledger = await asyncio.to_thread(opened, data / "receipts.sqlite")
        except LedgerError as exc:
            logger.error("%s; this run keeps its receipts in memory only", exc)
            self.ledger = opened(None)
        self.model = served.swarm_name

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        p2p = self._dht.p2p
        if p2p is not None and p2p.is_alive:
            for handle in (RECEIPT_HANDLE, PROOF_HANDLE):
                with contextlib.suppress(Exception):
                    await p2p.remove_binary_stream_handler(handle)
        if self.ledger is not None:
            self.ledger.close()
        self.board.close()

    def register_control(self, control: ControlServer) -> None:
        """Adds the control method `leaderboard`."""
        control.register(LEADERBOARD, self.leaderboard)

    async def leaderboard(self, params: NoParams) -> LeaderboardReply:
        """Control method: the audited board, and this daemon's credit per day."""
        history = []
        if self.ledger is not None:
            history = self.ledger.daily_credit(days=HISTORY_DAYS, now_s=self._clock())
        return LeaderboardReply(rows=self._rows(), own_peer_id=self.peer_id, history=history)

    def status(self) -> CreditStatus:
        ledger = self.ledger
        if ledger is None:
            return CreditStatus()
        built = ledger.built or ledger.build(self._clock(), is_banned=self._is_banned)
        own = credit_standing(built)
        rows = self._rows()
        rank = next((row.rank for row in rows if row.is_self), None)
        return CreditStatus(
            credit_total=round(own.total, 3),
            credit_recent=round(own.recent_average, 3),
            credit_held=round(own.held, 3),
            credit_rank=rank,
            receipts_kept=len(ledger),
            receipts_refused=self.refused,
            board_size=len(rows),
        )

    def _rows(self) -> list[BoardRow]:
        return board_rows(self.board, self._trust.reputation, own=self.peer_id, now_s=self._clock())

    def _is_banned(self, peer_id: str) -> bool:
        return self._trust.reputation.is_banned(peer_id)

    async def _receive(self, peer: str, body: bytes) -> bytes:
        """`RECEIPT_HANDLE`: keeps a receipt; the reason it was refused ("" : kept)."""
        reason = self._take(peer, body)
        if reason:
            self.refused += 1
            logger.debug("refused a receipt from %s: %s", peer, reason)
        return reason.encode()

    def _take(self, peer: str, body: bytes) -> str:
        if self.ledger is None:
            return "not taking receipts yet"
        try:
            reason = take_receipt(self.ledger, self._blocks.stats.work.claim, peer=peer, body=body)
        except LedgerError as exc:
            logger.error("%s", exc)
            return "not kept: the server cannot write its receipts"
        if not reason:
            self._changed.set()
        return reason

    async def _prove(self, peer: str, body: bytes) -> bytes:
        """`PROOF_HANDLE`: the leaves an auditor's draws fall on, with their paths."""
        root, coefficients, points = unpack_draws(body)
        built = self._trees.get(root)
        if built is None or self.ledger is None:
            return pack_proofs([])
        proven = []
        for point in points:
            if point >= weight(built.tree.sums, coefficients):
                return pack_proofs([])
            leaf, path = proof_at(built, coefficients, point)
            signed = self.ledger.signed(leaf.receipt_id.hex())
            proven.append((leaf, path, signed.to_bytes() if signed is not None else b""))
        return pack_proofs(proven)

    async def _publish_forever(self) -> None:
        while True:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._changed.wait(), PUBLISH_S)
            self._changed.clear()
            try:
                await self._publish()
            except Exception as exc:  # the next round tries again
                logger.warning("publishing the credit summary failed: %s", exc)
            await asyncio.sleep(MIN_PUBLISH_S)

    async def _publish(self) -> None:
        summary = self.summary()
        if summary is None or self._dht.node is None:
            return
        stored = await publish_on_node(
            self._dht.node, summary, owner=self._owner, timeout_s=DHT_TIMEOUT_S
        )
        if not stored:
            logger.info("the credit summary was not stored; the next round tries again")

    def summary(self) -> Summary | None:
        """This daemon's summary as of now (its tree kept for auditors' draws)."""
        ledger = self.ledger
        if ledger is None:
            return None
        built = ledger.build(self._clock(), is_banned=self._is_banned)
        self._trees[built.tree.root] = built
        while len(self._trees) > KEPT_TREES:
            self._trees.popitem(last=False)
        info = self._blocks.info
        return summary_of(
            ledger,
            built,
            public_name=self._settings.public_name or "",
            blocks=(info.start, info.end) if info is not None else (0, 0),
            online_since_s=self._started_s,
        )

    async def _audit_forever(self) -> None:
        while True:
            try:
                await self.audit_round()
            except Exception as exc:  # the next round tries again
                logger.warning("auditing credit summaries failed: %s", exc)
            await asyncio.sleep(audit_period_s(self.audit_s, self._read_last, self._quiet))

    async def audit_round(self) -> None:
        """Reads every summary and audits those not audited yet."""
        if self._dht.node is None:
            return
        found = await read_on_node(self._dht.node, self.model, timeout_s=DHT_TIMEOUT_S)
        if found is None:
            return
        self._read_last = len(found)
        self.board.look(set(found))
        # Rounds with nothing new to audit come further apart (`audit_period_s`).
        self._quiet = (
            0 if any(not self._is_audited(p, s) for p, s in found.items()) else (self._quiet + 1)
        )
        now = self._clock()
        waiting = [(p, s) for p, s in found.items() if not self._is_audited(p, s)]
        self._rng.shuffle(waiting)
        slots = asyncio.Semaphore(AUDITS_AT_ONCE)
        await asyncio.gather(*(self._audit_one(p, s, now, slots) for p, s in waiting[:MAX_AUDITS]))

    async def _audit_one(
        self, peer: str, summary: Summary, now: float, slots: asyncio.Semaphore
    ) -> None:
        if peer == self.peer_id:
            self.board.audited(peer, summary, now)  # our own: we counted it
            return
        finding = first_look(peer, summary, model=self.model, now_s=now, is_banned=self._is_banned)
        if finding is None:
            try:
                async with slots:
                    finding = await audit(
                        self._dht.p2p,
                        peer,
                        summary,
                        params_per_block=self.params_per_block,
                        rng=self._rng,
                        is_banned=self._is_banned,
                    )
            except ExchangeError as exc:
                logger.info("could not audit %s now: %s", peer, exc)
                return
        if finding is None:
            self.board.audited(peer, summary, now)
            return
        logger.warning("dropped the credit summary of %s: %s", peer, finding.reason)
        self.board.failed(peer, finding.reason, summary.root)
        if finding.is_proof:  # its own signed summary lies: a failed check, and a ban
            reputation = self._trust.reputation
            reputation.record_check(peer, passed=False)
            reputation.ban(peer, f"credit summary: {finding.reason}")

    def _is_audited(self, peer: str, summary: Summary) -> bool:
        """Whether this summary was audited already (passed, or failed)."""
        entry = self.board.get(peer)
        if entry is None:
            return False
        if entry.failed_root == summary.root:
            return True
        return entry.summary is not None and entry.summary.root == summary.root
