"""The validator role: a daemon spends a bounded share of its time checking other
servers, so that checks happen even when few clients verify.

Each round it takes the least checked server of the model (newcomers on probation
first; never itself, nor one it banned), opens a short session on the server's span,
and sends a probe: a prefill of a few random positions, then a few single steps (how
many, and the session's length, drawn each time), each recomputed on blocks this daemon
computes itself (`local_checks.local_blocks`). A step off by more than the tolerance
bans the server here, and files an accusation with the session's signed steps as
evidence when the error is clear (`client.verification.is_proof`); a probe that
matches counts as a passed check. A server that fails a probe (gone, refusing, answering
garbage) is left out for `FAILED_BACKOFF_S`, and the round goes on to the next. After a
round of t seconds (at most `MAX_ROUND_S` counted) it rests
`scheduler.verification.validator_rest_s` (the `validate_share` setting: at most that
share of its time, up to 5x more while it serves no blocks
(`scheduler.verification.validator_share`); 0 turns the role off).

Drill `lie-accuse[:RATE]` (`volunteer.faults`): a RATE share of the probes that pass
are accused all the same: false accusations, which the swarm must refute.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import random
import time
from collections.abc import Callable

import torch
from hivemind.p2p import PeerID

from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.client.verification import LocalComputation, is_proof
from volunteer.daemon.accusation_service import AccusationService
from volunteer.daemon.block_service import BlockService
from volunteer.daemon.dht_service import DHTService
from volunteer.daemon.local_checks import local_blocks
from volunteer.faults import Faults
from volunteer.scheduler.verification import probe_order, validator_rest_s, validator_share
from volunteer.swarm.records import ServerState
from volunteer.trust.reputation import Reputation
from volunteer.trust.tolerance import first_mismatch, tolerance_for_format

PROBE_PREFILL = (2, 12)
PROBE_STEPS = (2, 6)
PROBE_SLACK = (0, 32)
"""Ranges the probe's prefill, single steps and unused length are drawn from."""
PROBE_TIMEOUT_S = 60.0
FAILED_BACKOFF_S = 300.0
MAX_ROUND_S = 5.0
"""The most of a round's time that counts toward the rest: a server that stalls a
probe must not put the validator to sleep for hours."""
MIN_REST_S = 5.0
FIRST_ROUND_S = 1.0
"""The round assumed before the first: the first rest is what such a round earns."""

logger = logging.getLogger(__name__)


class Validator:
    """Probes other servers in the background (see the module)."""

    def __init__(
        self,
        dht: DHTService,
        blocks: BlockService,
        reputation: Callable[[], Reputation],
        accusations: AccusationService,
        *,
        share: float,
        faults: Faults,
        rng: random.Random | None = None,
    ) -> None:
        self._dht = dht
        self._blocks = blocks
        self._reputation = reputation
        self._accusations = accusations
        self.share = share
        self._lie_rate = faults.rate_of("lie-accuse")
        self._rng = rng or random.Random()
        self._local: Callable | None = None
        self._running: asyncio.Task | None = None
        self._failed: dict[str, float] = {}
        """Peer -> when (monotonic) a probe of it last failed."""
        self.probes = 0

    def start(self) -> None:
        if self.share > 0:
            self._running = asyncio.create_task(self._run(), name="validator")

    async def stop(self) -> None:
        if self._running is not None:
            self._running.cancel()
            await asyncio.gather(self._running, return_exceptions=True)

    def current_share(self) -> float:
        """The share of time to spend now: more while this daemon serves nothing."""
        return validator_share(self.share, is_serving=self._blocks.handler is not None)

    async def _run(self) -> None:
        round_s = FIRST_ROUND_S
        while True:
            share = self.current_share()
            await asyncio.sleep(validator_rest_s(round_s, share, min_rest_s=MIN_REST_S))
            began = asyncio.get_running_loop().time()
            try:
                await self.probe_next()
            except Exception as exc:  # the DHT, the model's files: next round
                logger.info("a validator round failed: %s", exc)
            round_s = min(MAX_ROUND_S, asyncio.get_running_loop().time() - began)

    async def probe_next(self) -> str | None:
        """Probes the least checked server; its peer id (None: none to probe)."""
        reputation = self._reputation()
        own = self._dht.peer_id
        servers = {
            each["peer_id"]: each
            for each in (await self._blocks.describe_swarm())["servers"]
            if each["peer_id"] != own
            and each.get("state") != ServerState.OFFLINE
            and not reputation.is_banned(each["peer_id"])
        }
        now = time.monotonic()
        self._failed = {p: t for p, t in self._failed.items() if now - t < FAILED_BACKOFF_S}
        records = {peer: reputation.of(peer).record for peer in servers if peer not in self._failed}
        for peer in probe_order(records, {peer: self._rng.random() for peer in records}):
            server = servers[peer]
            try:
                if await self.probe(peer, server["start"], server["end"]):
                    return peer
            except Exception as exc:  # the server's failure: the next one is probed
                logger.info("a probe of %s failed: %s", peer, exc)
                self._failed[peer] = time.monotonic()
        return None

    async def probe(self, peer: str, start: int, end: int) -> bool:
        """Checks one server on blocks [start, end); False when this daemon cannot
        compute those blocks."""
        model = await self._blocks.served_model()
        if self._local is None:
            fmt = await asyncio.to_thread(lambda: self._blocks.fmt)
            self._local = local_blocks(model, fmt, self._blocks)
        span = await asyncio.to_thread(self._local, start, end)
        if span is None:
            return False
        prefill = self._rng.randint(*PROBE_PREFILL)
        length = prefill + self._rng.randint(*PROBE_STEPS)
        hidden = torch.randn(1, length, model.config.hidden_size)
        peer_id = PeerID.from_base58(peer)
        remote = RemoteSpan(p2p=self._dht.p2p, peer_id=peer_id, start=start, end=end)
        max_length = length + self._rng.randint(*PROBE_SLACK)
        stream = await remote.open_inference(max_length=max_length, batch_size=1)
        local = LocalComputation(span, batch_size=1, max_length=length)
        cuts = [0, prefill, *range(prefill + 1, length + 1)]
        self.probes += 1
        try:
            for begin, stop in itertools.pairwise(cuts):
                chunk = hidden[:, begin:stop]
                output = await stream.step(chunk, begin, timeout_s=PROBE_TIMEOUT_S)
                expected = await local.step(chunk, begin)
                if first_mismatch(output, expected, self._tolerance()) is not None:
                    reason = f"wrong output on blocks {start}:{end} at {begin}"
                    self._wrong(peer, stream, reason, output, expected)
                    return True
        finally:
            await local.close()
            with contextlib.suppress(Exception):
                await stream.close()
        self._reputation().record_check(peer, passed=True)
        if stream.log is not None and self._rng.random() < self._lie_rate:
            evidence = stream.log.evidence()
            assert evidence is not None  # the probe ran its steps
            lie = f"wrong output on blocks {start}:{end} at {length - 1}"
            logger.warning("DRILL: accusing %s falsely (%s)", peer, lie)
            self._accusations.accuse(peer, evidence, lie)
        return True

    def _tolerance(self) -> float:
        """For the swarm's weight form (this daemon's: clients route through servers of
        their own form only); `probe` resolved it before any comparison."""
        return tolerance_for_format(self._blocks.fmt.label)

    def _wrong(
        self,
        peer: str,
        stream: InferenceStream,
        reason: str,
        output: torch.Tensor,
        expected: torch.Tensor,
    ) -> None:
        reputation = self._reputation()
        reputation.record_check(peer, passed=False)
        reputation.ban(peer, f"{reason} (a validator's probe)")
        logger.warning("banned %s: %s (a validator's probe)", peer, reason)
        evidence = stream.log.evidence() if stream.log is not None else None
        if is_proof(evidence, output, expected, self._tolerance()):
            assert evidence is not None  # checked by is_proof
            self._accusations.accuse(peer, evidence, reason)
