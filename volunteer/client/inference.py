"""A fault-tolerant inference session across a chain of remote spans.

The client keeps, for every hop of its route, the hidden states it has sent so far. When
a server dies or refuses mid-generation, the session asks for another route over that
hop's blocks (avoiding the failed peer), replays the kept inputs there to rebuild the
server-side KV cache, and carries on: the caller sees the same outputs (within float
rounding), a little later. A replay is a prefill: the kept inputs go in as few steps as
the new server takes, not one round trip per past step.

Peer and network errors, and replies that are not valid (`BadReplyError`), are the
server's failure: retried elsewhere. A server's "bad request" may be a lie as well, so
the session checks its own input first (the same batch, hidden size and dtype as its
first step, no gap in positions): input that passes, yet is refused, is tried on
another replica; only when `MAX_REFUSALS` servers refuse the same step is the refusal
believed and raised.

Errors::

    VolunteerError
    └── SessionFailedError    no route left for a hop, or failovers exhausted
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Awaitable, Callable

import torch

from volunteer.client.hops import Hop
from volunteer.client.positions import regroup
from volunteer.client.receipt_sender import HopWork
from volunteer.client.repair import RepairWait
from volunteer.client.stream_types import InferenceStreamLike, OpenStream, PlanRoute
from volunteer.client.verification import Verifier, WrongOutputError
from volunteer.errors import VolunteerError
from volunteer.scheduler.routing import Backoff, NoRouteError, RouteHop
from volunteer.transport.protocol import BadRequestError, NextHop, SessionExpiredError
from volunteer.trust.step_log import StepLog

logger = logging.getLogger(__name__)


MAX_REFUSALS = 2
"""Servers that may refuse one step as a bad request before the refusal is believed."""


class SessionFailedError(VolunteerError):
    """The session could not continue: no route left, or retries exhausted."""


class SwarmInferenceSession:
    """Runs hidden states through a route of remote spans, surviving server failures."""

    def __init__(
        self,
        *,
        plan_route: PlanRoute,
        open_stream: OpenStream,
        retriable: tuple[type[BaseException], ...],
        backoff: Backoff,
        clock: Callable[[], float],
        step_timeout_s: float,
        max_failovers: int = 8,
        reread: Callable[[], Awaitable[None]] | None = None,
        verifier: Verifier | None = None,
        repair_wait_s: float = 0.0,
        notify: Callable[[str], None] | None = None,
        on_hop_end: Callable[[HopWork], None] | None = None,
    ) -> None:
        """
        Args:
            on_hop_end: told what each hop's server did once the hop ends (its receipt).
            reread, repair_wait_s, notify: when the view `plan_route` plans with has no
                route left, a read of the swarm, and a wait for it to be repaired, told
                to `notify` (`volunteer.client.repair`).
            verifier: checks a share of each hop's steps (None: none are checked).
        """
        self._verifier = verifier
        self._on_hop_end = on_hop_end
        self._repair = RepairWait(repair_wait_s, reread, notify)
        self._plan_route = plan_route
        self._open_stream = open_stream
        self._retriable = retriable
        self._backoff = backoff
        self._clock = clock
        self._step_timeout_s = step_timeout_s
        self._failovers_left = max_failovers
        self._failed_peers: set[str] = set()
        self._failures = [0, 0]
        """Peers failed for the first time in this session, and again, since the last
        failover was paid for (`_pay_failover`)."""
        self._hops: list[Hop] = []
        self._steps = 0
        self._shape: tuple[int, int, torch.dtype] | None = None
        """Batch, hidden size and dtype of the first step: every step must keep them."""
        self._refusals_left = MAX_REFUSALS
        self.route_history: list[list[RouteHop]] = []

    @property
    def route(self) -> list[RouteHop]:
        return [hop.hop for hop in self._hops]

    def logs(self) -> list[StepLog | None]:
        """Each hop's signed steps, in route order (None: a hop that keeps none)."""
        return [getattr(hop.stream, "log", None) for hop in self._hops]

    async def open(self, start: int, end: int) -> None:
        """Chooses a route over [start, end) and opens a stream on every hop."""
        self._refusals_left = MAX_REFUSALS
        self._hops = await self._open_hops(start, end, history=[])
        self.route_history.append(self.route)

    async def step(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        """Feeds hidden [B, S, H] at positions [start_pos, start_pos + S) through the route.

        A start_pos below the positions sent so far rewinds the session there. A step
        longer than a hop takes at once (a long prompt) goes as several in a row.

        Raises:
            SessionFailedError: a hop failed and no replacement could be found.
            RuntimeError: the session is not open.
            Any non-retriable error of a stream (e.g. a bad request), unchanged.
        """
        if not self._hops:
            raise RuntimeError("the inference session is not open")
        self._check_input(hidden, start_pos)
        outputs, offset = [], 0
        while offset < hidden.shape[1]:
            # Asked again each time: a failover may have brought a hop with a lower limit.
            size = self._step_limit() or hidden.shape[1]
            piece = hidden[:, offset : offset + size]
            outputs.append(await self._step_once(piece, start_pos + offset))
            offset += piece.shape[1]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)

    def _step_limit(self) -> int | None:
        """The most positions every hop of the route takes in one step (None: unknown)."""
        limits = [hop.stream.max_chunk for hop in self._hops if hop.stream.max_chunk]
        return min(limits) if limits else None

    async def _step_once(self, hidden: torch.Tensor, start_pos: int) -> torch.Tensor:
        self._refusals_left = MAX_REFUSALS
        for hop in self._hops:
            hop.rewind(start_pos)
        self._steps += 1
        index = 0
        pushed_to: InferenceStreamLike | None = None
        """The stream the previous hop pushed this step to, if it did."""
        while index < len(self._hops):
            hop = self._hops[index]
            began = self._clock()
            grace_s = hop.push_grace_s(self._hops[index - 1]) if hop.stream is pushed_to else 0.0
            run = functools.partial(self._send_step, index, hidden, start_pos, grace_s)
            try:
                if self._verifier is not None and hop.check is None:
                    hop.check = self._verifier.hop_check(hop.hop.start, hop.hop.end)
                if hop.check is None:
                    output = await run(False)
                else:
                    output = await hop.check.step(
                        run, hop.hop.peer_id, hidden, start_pos, hop.inputs, log=self.logs()[index]
                    )
            except Exception as exc:
                if not self._is_server_fault(exc):
                    raise
                logger.warning(
                    "peer %s failed on blocks %d:%d at position %d: %s",
                    hop.hop.peer_id, hop.hop.start, hop.hop.end, start_pos, exc,
                )  # fmt: skip
                await self._replace(index, exc)
                pushed_to = None
                continue  # the same step, now through the replacement hops
            hop.step_s = self._clock() - began
            self._backoff.record_success(hop.hop.peer_id)
            hop.record([hidden])
            hidden = output
            index += 1
            is_pushed = hop.stream.pushed and index < len(self._hops)
            pushed_to = self._hops[index].stream if is_pushed else None
        return hidden

    def _send_step(
        self, index: int, hidden: torch.Tensor, start_pos: int, grace_s: float, is_checked: bool
    ) -> Awaitable[torch.Tensor]:
        """The step to hop `index`. Each server pushes its output on to the next
        (volunteer.server.push): the next hop's answer is awaited first, and the step
        sent to it only when that answer is late (the push was lost). A checked output
        is not pushed: the next server gets it from us once it has passed."""
        return self._hops[index].stream.step(
            hidden,
            start_pos,
            timeout_s=self._step_timeout_s,
            step_id=self._steps,
            push_to=[] if is_checked else self._push_route(index + 1),
            await_push_s=grace_s,
        )

    def _check_input(self, hidden: torch.Tensor, start_pos: int) -> None:
        """Refuses input that cannot be right whatever the server, before sending it.

        Raises:
            BadRequestError: another batch, hidden size or dtype than the first step's, or
                a start_pos past the positions sent so far.
        """
        if hidden.dim() != 3 or min(hidden.shape) < 1:
            raise BadRequestError(f"hidden states must be [B, S, H], got {list(hidden.shape)}")
        shape = (hidden.shape[0], hidden.shape[2], hidden.dtype)
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            batch, size, dtype = self._shape
            raise BadRequestError(
                f"batch {shape[0]}, hidden size {shape[1]}, {shape[2]} != the session's "
                f"batch {batch}, hidden size {size}, {dtype}"
            )
        if start_pos > self._hops[0].length:
            raise BadRequestError(
                f"start_pos {start_pos} skips past the {self._hops[0].length} positions sent"
            )

    def _blames_server(self, error: BaseException) -> bool:
        """Whether `error` may be the server's fault (a refusal may be, see the module)."""
        return isinstance(error, (*self._retriable, BadRequestError))

    def _is_server_fault(self, error: BaseException) -> bool:
        """Whether to try another server after `error`: a refusal counts against the
        step's MAX_REFUSALS."""
        if isinstance(error, WrongOutputError):
            return True
        if isinstance(error, BadRequestError) and not isinstance(error, self._retriable):
            if self._refusals_left <= 0:
                return False
            self._refusals_left -= 1
            return True
        return isinstance(error, self._retriable)

    def _push_route(self, index: int) -> list[NextHop]:
        """The hops from `index` on that can take pushes, up to the first that cannot."""
        targets = []
        for hop in self._hops[index:]:
            if (target := hop.stream.push_target) is None:
                break
            targets.append(target)
        return targets

    async def close(self) -> None:
        """Closes every stream; errors while closing are logged, not raised."""
        self._ended(self._hops)
        for hop in self._hops:
            try:
                await hop.stream.close()
            except self._retriable as exc:
                logger.info("closing the stream to %s failed: %s", hop.hop.peer_id, exc)
            if hop.check is not None:
                await hop.check.close()
        self._hops = []

    def _ended(self, hops: list[Hop]) -> None:
        for hop in hops if self._on_hop_end is not None else []:
            session_id, check = getattr(hop.stream, "session_id", None), hop.check
            if hop.tokens and isinstance(session_id, str):
                checks = (check.passed, check.failed) if check is not None else (0, 0)
                route = hop.hop
                work = HopWork(
                    route.peer_id,
                    route.start,
                    route.end,
                    session_id,
                    hop.tokens,
                    hop.opened_s,
                    *checks,
                )
                self._on_hop_end(work)  # type: ignore[misc]  # not None, by the loop

    def _record_failure(self, peer_id: str) -> None:
        self._backoff.record_failure(peer_id, self._clock())
        is_new = peer_id not in self._failed_peers
        self._failed_peers.add(peer_id)
        self._failures[0 if is_new else 1] += 1

    def _pay_failover(self) -> bool:
        """Spends the failovers for the failures since the last one (one each time at
        least); False when none are left. A peer failing again is free: a dead peer's
        records outlive it, and it fails each time its back-off ends (which doubles,
        so it cannot loop fast) while the swarm repairs the hole it left."""
        (new, again), self._failures = self._failures, [0, 0]
        self._failovers_left -= new if (new or again) else 1
        return self._failovers_left >= 0

    async def _replace(self, index: int, error: BaseException) -> None:
        failed = self._hops[index]
        self._ended([failed])
        if not isinstance(error, SessionExpiredError):
            # An expired session means the client idled, not that the server is bad:
            # the replay may go to the same server.
            self._record_failure(failed.hop.peer_id)
        if not self._pay_failover():
            raise SessionFailedError("too many server failures in one session; giving up")
        with contextlib.suppress(*self._retriable):
            await failed.stream.close()  # it is most likely gone already
        if failed.check is not None:
            await failed.check.close()
        replacement = await self._open_hops(failed.hop.start, failed.hop.end, failed.inputs)
        self._hops[index : index + 1] = replacement
        self.route_history.append(self.route)

    async def _open_hops(self, start: int, end: int, history: list[torch.Tensor]) -> list[Hop]:
        """Opens streams over [start, end), replaying `history` through them in order."""
        while True:
            avoid = self._backoff.avoided(self._clock())
            if self._verifier is not None:
                avoid |= self._verifier.banned()
            try:
                route = self._plan_route(start, end, avoid)
            except NoRouteError as exc:
                if await self._repair.again(exc.gap):
                    continue
                gap = f"{exc.gap[0]}:{exc.gap[1]}"
                raise SessionFailedError(
                    f"no servers left for blocks {gap} (of the route over {start}:{end}; "
                    f"avoiding {len(avoid)} failed peer(s))"
                ) from exc
            try:
                hops = await self._open_and_replay(route, history)
            except Exception as exc:
                if not self._is_server_fault(exc):
                    raise
                if not self._pay_failover():
                    raise SessionFailedError("too many server failures in one session") from exc
                logger.warning("opening route %s failed: %s; trying another", route, exc)
                continue
            self._repair.found()
            return hops

    async def _open_and_replay(
        self, route: list[RouteHop], history: list[torch.Tensor]
    ) -> list[Hop]:
        # Each hop's outputs are the next hop's history.
        hops = await self._open_all(route)
        chunks = history
        for hop in hops:
            try:
                chunks = await self._replay(hop, chunks)
            except BaseException as exc:
                # Whatever the failure (a bad request, a cancellation too), the sessions
                # opened so far must not keep holding cache on their servers.
                if self._blames_server(exc):
                    self._record_failure(hop.hop.peer_id)
                self._ended(hops)
                await _close_all(hops)
                raise
        return hops

    async def _open_all(self, route: list[RouteHop]) -> list[Hop]:
        """Opens a stream on every hop at once (a route's set-up costs one round trip,
        not one per hop); if any fails, closes the others and raises its error."""
        # Opened before the first step, or by a failover in step N, which the new hops
        # are sent next.
        next_step_id = max(self._steps, 1)
        opening = [
            (hop, asyncio.ensure_future(self._open_stream(hop, next_step_id))) for hop in route
        ]
        tasks = [task for _, task in opening]
        try:
            await asyncio.wait(tasks)
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await _close_all([Hop(hop, task.result()) for hop, task in opening if _opened(task)])
            raise
        hops = [Hop(hop, task.result()) for hop, task in opening if _opened(task)]
        failed = [(hop, task.exception()) for hop, task in opening if not _opened(task)]
        if failed:
            for hop, error in failed:
                if self._blames_server(error):
                    self._record_failure(hop.peer_id)
            await _close_all(hops)
            # A bug is surfaced first; a refusal only after plain failures, so that it
            # spends the step's refusals only when nothing else went wrong.
            errors = [error for _, error in failed]
            bugs = [error for error in errors if not self._blames_server(error)]
            plain = [error for error in errors if isinstance(error, self._retriable)]
            raise (bugs or plain or errors)[0]  # type: ignore[misc]  # exceptions, by _opened()
        return hops

    async def _replay(self, hop: Hop, chunks: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sends `chunks` (positions 0, 1, ... in order) through a fresh hop, in as few
        steps as its server takes; the outputs of those steps, in order.

        A history of N decode steps is one prefill, not N round trips (a failover late in
        a long answer would otherwise stall it for seconds). The rebuilt cache equals
        the lost one within float rounding: a prefill sums in another order than single
        steps do, as on any replica with other hardware.
        """
        steps = regroup(chunks, hop.stream.max_chunk)
        outputs, position = [], 0
        for piece in steps:
            outputs.append(await hop.stream.step(piece, position, timeout_s=self._step_timeout_s))
            position += piece.shape[1]
        hop.record(steps)
        return outputs


def _opened(task: asyncio.Future[InferenceStreamLike]) -> bool:
    return task.done() and not task.cancelled() and task.exception() is None


async def _close_all(hops: list[Hop]) -> None:
    for hop in hops:
        try:
            await hop.stream.close()
        except Exception as exc:  # best effort: the route is being abandoned anyway
            logger.debug("closing %s failed: %s", hop.hop.peer_id, exc)
