"""Checking servers' inference steps by recomputing them elsewhere (issue 15).

A share of the hops of sessions (`scheduler.verification`: every one of a newcomer or
with `verify all`, fewer as the server's record grows) is shadowed: each step of the hop
is also run on an independent computation of the same blocks, a shadow session on
another replica or the blocks computed in this process where no replica is left,
concurrently with the server's own step. The draw is per hop, once: a shadow must see
every position of the session to check any later step, so checking a share of a hop's
steps would cost as much as checking them all, while a hop not drawn costs nothing. A
shadow replaced mid-session (it failed, or was caught) is first sent the positions it
has not seen, in as few steps as it takes.

Outputs are compared per position within the tolerance (`trust.tolerance`). On a
mismatch a third computation over the whole history decides: the side that disagrees
with it is wrong. A wrong server is banned (`trust.reputation`) and its step raises
`WrongOutputError`, which the session treats as that server's failure: it replays the
hop on another replica, which is checked in turn, so that the caller gets the honest
output. A wrong shadow is banned and replaced; with no third computation, or when it
agrees with neither, nobody is banned and the server's output is not used.

A checked step's output is not pushed on to the next hop (see `SwarmInferenceSession`):
nothing unverified reaches the next server on a shadowed hop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Protocol

import torch

from volunteer.client.positions import between
from volunteer.errors import VolunteerError
from volunteer.models.model import BlockSpan
from volunteer.scheduler.verification import Mode, is_checked_now
from volunteer.trust.evidence import Evidence, EvidenceError, UndecidableError
from volunteer.trust.reputation import Reputation
from volunteer.trust.step_log import StepLog
from volunteer.trust.tolerance import FLOAT32_TOLERANCE, first_mismatch, relative_distances

logger = logging.getLogger(__name__)


class WrongOutputError(VolunteerError):
    """A server's output was found wrong by a check: the server's failure."""


class Computation(Protocol):
    """An independent computation of some blocks, with its own cache."""

    @property
    def peers(self) -> frozenset[str]:
        """The peers computing it (none: this process)."""

    async def step(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor: ...

    def evidence(self) -> Evidence | None:
        """The evidence of its last step, when one server signed it all (else None)."""

    async def close(self) -> None: ...


OpenComputation = Callable[[int, int, frozenset[str]], Awaitable[Computation | None]]
"""Opens a computation of blocks [start, end) avoiding the given peers; None if none."""


def computation_opener(
    open_session: Callable[[int, int, frozenset[str]], Awaitable[_Session]],
    local_span: Callable[[int, int], Awaitable[BlockSpan | None]] | None,
    *,
    no_route: tuple[type[BaseException], ...],
    batch_size: int,
    max_length: int,
) -> OpenComputation:
    """An `OpenComputation` that opens a session of other servers (`open_session`, which
    raises one of `no_route` when none is left) or else computes the blocks here, from
    `local_span` (None, or a span of None: this process cannot)."""

    async def open_computation(start: int, end: int, avoid: frozenset[str]) -> Computation | None:
        try:
            return SessionComputation(await open_session(start, end, avoid))
        except no_route:
            pass  # no other replica: this process's own blocks, if it has them
        span = await local_span(start, end) if local_span is not None else None
        if span is None:
            return None
        return LocalComputation(span, batch_size=batch_size, max_length=max_length)

    return open_computation


async def no_computation(start: int, end: int, avoid: frozenset[str]) -> Computation | None:
    """An `OpenComputation` with nothing to open: checks that recompute by other means
    (`volunteer.client.call_checks`)."""
    return None


@dataclasses.dataclass
class Verifier:
    """What the checks of a client's sessions share."""

    mode: Mode
    reputation: Reputation
    open_computation: OpenComputation = no_computation
    rng: random.Random = dataclasses.field(default_factory=random.Random)
    tolerance: float = FLOAT32_TOLERANCE
    trusted: frozenset[str] = frozenset()
    """Peers never checked: this process's own (its blocks are what checks fall back on)."""
    checked: int = 0
    """Steps checked so far."""
    wrong: int = 0
    """Servers' steps found wrong (and their servers banned)."""
    unresolved: int = 0
    """Mismatches no third computation could decide."""
    unverifiable: int = 0
    """Steps that were to be checked, with no independent computation to check them."""

    accuse: Callable[[str, Evidence, str], None] | None = None
    """Called with a server found wrong, the evidence and the reason: files an
    accusation (`volunteer.trust.accusations`); None: the ban stays this peer's own."""

    def wants_check(self, peer_id: str, *, is_committed: bool = True) -> bool:
        """Whether to check the server's work now (a hop, a call); one that does not
        commit to its steps cannot be accused, only caught: it is checked always."""
        if peer_id in self.trusted or self.mode == "off":
            return False
        record = self.reputation.of(peer_id).record
        return not is_committed or is_checked_now(record, self.mode, self.rng.random())

    def banned(self) -> frozenset[str]:
        return self.reputation.banned()

    def hop_check(self, start: int, end: int) -> HopCheck:
        return HopCheck(self, start, end)


class HopCheck:
    """The checks of one hop (blocks [start, end)): its shadow and how far it is."""

    def __init__(self, verifier: Verifier, start: int, end: int) -> None:
        self.verifier = verifier
        self.start, self.end = start, end
        self._shadow: Computation | None = None
        self._shadow_length = 0
        self._is_shadowed: bool | None = None
        """Drawn at the hop's first step (see the module)."""
        self.passed = self.failed = 0
        """The hop's server's steps checked and found right, and found wrong."""

    async def step(
        self,
        primary: Callable[[bool], Awaitable[torch.Tensor]],
        peer_id: str,
        hidden: torch.Tensor,
        start_pos: int,
        history: list[torch.Tensor],
        *,
        log: StepLog | None = None,
    ) -> torch.Tensor:
        """The server's output of this step, checked when the policy draws it.

        `primary(is_checked)` runs the step on the server (a checked step's output must
        not be pushed on); `history` holds the hop's inputs before `start_pos`; `log`
        is the server session's signed steps (the evidence should it be found wrong).

        Raises:
            WrongOutputError: the server's output was found wrong (it is banned), or a
                mismatch could not be decided (nobody is).
            Whatever `primary` raises.
        """
        verifier = self.verifier
        if self._is_shadowed is None:
            self._is_shadowed = verifier.wants_check(peer_id, is_committed=log is not None)
        if not self._is_shadowed:
            return await primary(False)
        shadowing = asyncio.ensure_future(self._shadow_step(peer_id, hidden, start_pos, history))
        try:
            output = await primary(True)
        except BaseException:
            shadowing.cancel()
            await asyncio.gather(shadowing, return_exceptions=True)
            raise
        expected = await shadowing
        if expected is None:
            verifier.unverifiable += 1
            return output
        verifier.checked += 1
        tolerance = verifier.tolerance
        if first_mismatch(output, expected, tolerance) is None:
            self.passed += 1
            self._passed({peer_id} | self._shadow_peers())
            return output
        return await self._decide(peer_id, output, expected, hidden, start_pos, history, log)

    async def close(self) -> None:
        shadow, self._shadow = self._shadow, None
        if shadow is not None:
            with contextlib.suppress(Exception):
                await shadow.close()

    def _shadow_peers(self) -> frozenset[str]:
        return self._shadow.peers if self._shadow is not None else frozenset()

    def _passed(self, peers: set[str] | frozenset[str]) -> None:
        for peer in peers:
            self.verifier.reputation.record_check(peer, passed=True)

    async def _shadow_step(
        self, peer_id: str, hidden: torch.Tensor, start_pos: int, history: list[torch.Tensor]
    ) -> torch.Tensor | None:
        """The shadow's output of the step (None: no independent computation)."""
        if self._shadow is not None and (peer_id in self._shadow.peers or self._shadow_banned()):
            await self.close()  # it must not be the server it checks, nor a banned one
        try:
            if self._shadow is None:
                avoid = frozenset({peer_id}) | self.verifier.banned()
                self._shadow = await self.verifier.open_computation(self.start, self.end, avoid)
                self._shadow_length = 0
                if self._shadow is None:
                    return None
            if self._shadow_length < start_pos:
                missing = between(history, self._shadow_length, start_pos)
                await self._shadow.step(torch.cat(missing, dim=1), self._shadow_length)
            output = await self._shadow.step(hidden, start_pos)
            self._shadow_length = start_pos + hidden.shape[1]
            return output
        except asyncio.CancelledError:
            await self.close()  # its cache may be ahead of what it was told
            raise
        except Exception as exc:  # the shadow's own servers failed past its failovers
            logger.info("the shadow of blocks %d:%d failed: %s", self.start, self.end, exc)
            await self.close()
            return None

    def _shadow_banned(self) -> bool:
        return bool(self._shadow_peers() & self.verifier.banned())

    async def _decide(
        self,
        peer_id: str,
        output: torch.Tensor,
        expected: torch.Tensor,
        hidden: torch.Tensor,
        start_pos: int,
        history: list[torch.Tensor],
        log: StepLog | None,
    ) -> torch.Tensor:
        verifier = self.verifier
        shadow_peers = self._shadow_peers()
        where = f"blocks {self.start}:{self.end} at position {start_pos}"
        avoid = frozenset({peer_id}) | shadow_peers
        verdict = await self._third_opinion(avoid, hidden, start_pos, history)
        if verdict is None:
            verifier.unresolved += 1
            await self.close()
            raise WrongOutputError(f"{where}: {peer_id} and its shadow disagree, undecided")
        tolerance = verifier.tolerance
        is_right = first_mismatch(output, verdict, tolerance) is None
        is_shadow_right = first_mismatch(expected, verdict, tolerance) is None
        if is_right:
            self.passed += 1
            self._passed({peer_id})
            if not is_shadow_right:
                evidence = self._shadow.evidence() if self._shadow is not None else None
                reason = f"wrong output on {where} (as a shadow)"
                self._convict(shadow_peers, reason, (evidence, expected, verdict))
                await self.close()
            return output
        if is_shadow_right:
            self._passed(shadow_peers)
        else:
            await self.close()
        evidence = log.evidence() if log is not None else None
        self.failed += 1
        self._convict(frozenset({peer_id}), f"wrong output on {where}", (evidence, output, verdict))
        raise WrongOutputError(f"{peer_id} answered {where} wrong: a check found it")

    async def _third_opinion(
        self, avoid: frozenset[str], hidden: torch.Tensor, start_pos: int, history: list
    ) -> torch.Tensor | None:
        """The step's output by a computation that avoids both sides, over the whole
        history (None: there is none, or it failed)."""
        try:
            third = await self.verifier.open_computation(
                self.start, self.end, avoid | self.verifier.banned()
            )
        except Exception as exc:  # e.g. the model's files could not be read
            logger.warning("no third computation of blocks %d:%d: %s", self.start, self.end, exc)
            return None
        if third is None:
            return None
        try:
            if start_pos > 0:
                await third.step(torch.cat(between(history, 0, start_pos), dim=1), 0)
            return await third.step(hidden, start_pos)
        except Exception as exc:
            logger.info(
                "the third computation of blocks %d:%d failed: %s", self.start, self.end, exc
            )
            return None
        finally:
            with contextlib.suppress(Exception):
                await third.close()

    def _convict(
        self,
        peers: frozenset[str],
        reason: str,
        proof: tuple[Evidence | None, torch.Tensor, torch.Tensor],
    ) -> None:
        """Bans `peers` when the blame is theirs alone: one peer (a shadow of several
        servers cannot say which of them was wrong); accuses it where `proof` (its
        signed steps, the output found wrong and the verdict) will convince others."""
        if len(peers) != 1:
            return
        (peer,) = peers
        verifier = self.verifier
        verifier.wrong += 1
        verifier.reputation.record_check(peer, passed=False)
        standing = verifier.reputation.ban(peer, reason)
        logger.warning("banned %s until %.0f: %s", peer, standing.banned_until_s, reason)
        if verifier.accuse is not None and is_proof(*proof, verifier.tolerance):
            assert proof[0] is not None  # checked by _is_proof
            verifier.accuse(peer, proof[0], reason)


ACCUSE_FACTOR = 10.0
"""A wrong output is accused only this many times farther than the tolerance from the
verdict: judges recompute with the same tolerance, and an accusation that some judges
find within it would cost its honest accuser its standing there."""


def is_proof(
    evidence: Evidence | None, wrong: torch.Tensor, verdict: torch.Tensor, tolerance: float
) -> bool:
    """Whether `evidence` proves `wrong` to others: its claimed output is exactly the
    output found wrong (a shadow may have split the step: then only its last part is
    signed alone), and far enough from the verdict that no judge could find it right."""
    if evidence is None:
        return False
    try:
        claimed = evidence.claimed_output()
    except (EvidenceError, UndecidableError):
        return False
    if claimed.shape != wrong.shape or not torch.equal(claimed, wrong):
        logger.info("a wrong output was not signed as one step: banned here only")
        return False
    return bool(relative_distances(wrong, verdict).max() > ACCUSE_FACTOR * tolerance)


class LocalComputation:
    """Blocks computed in this process (the arbiter of last resort), with a cache."""

    def __init__(self, span: BlockSpan, *, batch_size: int, max_length: int) -> None:
        self.span = span
        self.batch_size = batch_size
        self.max_length = max_length
        self._cache = None

    @property
    def peers(self) -> frozenset[str]:
        return frozenset()

    async def step(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        return await asyncio.to_thread(self._step, hidden, start_pos)

    def _step(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        weight = next(self.span.parameters())
        with torch.inference_mode():
            if self._cache is None:
                self._cache = self.span.allocate_cache(
                    batch_size=self.batch_size, max_length=self.max_length
                )
            output = self.span(
                hidden.to(device=weight.device, dtype=weight.dtype),
                start_pos=start_pos,
                cache=self._cache,
            )
            self._cache.length = start_pos + hidden.shape[1]
        return output.to(device=hidden.device, dtype=hidden.dtype)

    def evidence(self) -> Evidence | None:
        return None  # this process's own computation: nobody to accuse

    async def close(self) -> None:
        self._cache = None


async def replay_steps(span: BlockSpan, steps: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
    """The last output of `steps` ((start_pos, hidden) [B, S, H], in order: rewinds
    included) run through `span` on a fresh cache, as the server that took them ran
    them; what a judge compares evidence with (`volunteer.trust.evidence.is_wrong`)."""
    batch = steps[0][1].shape[0]
    length = max(position + hidden.shape[1] for position, hidden in steps)
    computation = LocalComputation(span, batch_size=batch, max_length=length)
    try:
        for position, hidden in steps:
            output = await computation.step(hidden, position)
    finally:
        await computation.close()
    return output


class _Session(Protocol):
    @property
    def route(self) -> list: ...

    def logs(self) -> list[StepLog | None]: ...

    async def step(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor: ...

    async def close(self) -> None: ...


class SessionComputation:
    """Blocks computed by other servers: a session of their own (with failover)."""

    def __init__(self, session: _Session) -> None:
        self.session = session

    @property
    def peers(self) -> frozenset[str]:
        return frozenset(hop.peer_id for hop in self.session.route)

    async def step(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        return await self.session.step(hidden, start_pos)

    def evidence(self) -> Evidence | None:
        logs = self.session.logs()
        return logs[0].evidence() if len(logs) == 1 and logs[0] is not None else None

    async def close(self) -> None:
        await self.session.close()
