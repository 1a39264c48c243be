"""The swarm as a client sees it: who serves which blocks, and sessions routed through them.

`SwarmClient` lives on the event loop that owns the P2P connections (the daemon's, or a
background loop in the CLI for `chat --swarm`). It reads the model's records from the DHT,
measures round trips to the servers it may use, plans the lowest-latency route for an
inference session and opens one stream per hop. Failures inside a session are handled by
`SwarmInferenceSession` (failover and replay); the peers that failed are avoided with
exponential back-off across sessions too.

Records are claims (`volunteer.client.server_view`). Only servers announcing the same
weights as the client's own files are routed through, and each counts at the speed the
client measured of it (`volunteer.client.measurements`, which times every step and call
it makes); a newcomer counts at its claim, capped, on probation, except in a small share
of inference routes that try newcomers, so that they get measured at all.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from collections.abc import Callable

import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P, PeerID

from volunteer.client.call_checks import CheckedCalls
from volunteer.client.inference import SessionFailedError, SwarmInferenceSession
from volunteer.client.measurements import PeerMeasurements
from volunteer.client.receipt_sender import ReceiptSender
from volunteer.client.remote_span import RemoteSpan
from volunteer.client.repair import REPAIR_WAIT_S
from volunteer.client.server_view import ServerView, Work
from volunteer.client.span_calls import Grads
from volunteer.client.spread import SpreadCalls, TracedHop
from volunteer.client.stream_types import InferenceStreamLike, OpenStream, OwnBlocks
from volunteer.client.verification import Verifier, WrongOutputError, computation_opener
from volunteer.models.adapters import SpanAdapter
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import (
    Backoff,
    RouteHop,
    ServerCandidate,
    inference_route,
    load_spread_route,
)
from volunteer.scheduler.verification import Mode, standing
from volunteer.swarm.dht_records import read_snapshot_on_node
from volunteer.swarm.records import SwarmSnapshot
from volunteer.transport.local_link import dialable
from volunteer.transport.protocol import BusyError, PeerUnavailableError, SessionExpiredError
from volunteer.trust.evidence import Evidence
from volunteer.trust.reputation import Reputation
from volunteer.trust.tolerance import tolerance_for_format

logger = logging.getLogger(__name__)

RETRIABLE_ERRORS = (PeerUnavailableError, BusyError, SessionExpiredError)
"""Peer and network trouble: another server may do. A bad request is a bug: raised."""
SNAPSHOT_TIMEOUT_S = 10.0
SNAPSHOT_MAX_AGE_S = 5.0
"""A session opened within this long of the last DHT read reuses it."""
SNAPSHOT_STALE_MAX_S = 60.0
"""A session opened later than SNAPSHOT_MAX_AGE_S but within this long routes with the
last read while a new one is read in the background: a DHT read (several peers) would
delay the first token, whereas a server gone since is one failover away."""
REVALIDATE_DELAY_S = 2.0
"""How long after a stale view was used the background read starts: a read makes daemons
validate records, which on shared cores slows the prefill that asked for it."""
TRIAL_SHARE = 0.1
"""Share of inference routes planned with newcomers judged by their claims (capped by
what their hardware could do) rather than on probation: how an unmeasured server gets
measured, and so the most routes a newcomer's lie can draw before it is."""
SHADOW_FAILOVERS = 2
"""Failovers a check's shadow session may take before the step goes unchecked."""
LocalBlocks = Callable[[int, int], BlockSpan | None]
"""Blocks [start, end) this process can compute itself; None where it cannot."""


class SwarmClient:
    """Routes inference sessions for one model through the swarm.

    Args:
        p2p, node: a running P2P daemon and DHT node on this event loop.
        model: the model's name in the swarm (its DHT keys).
        num_blocks: the model's number of transformer blocks.
        local_handler: this process's own block server, if it serves blocks: libp2p
            cannot dial itself, so its blocks are called in-process.
        step_timeout_s: the longest wait for one hop's step (or forward/backward call).
        clock: monotonic seconds (for back-off and timing servers).
        rng: draws the servers of forward/backward calls, and which inference routes try
            newcomers (seed it to reproduce a run).
        weights_hash, weights_format: the client's own weights (`weights_hash` of its
            model files) and their form: only servers announcing both are routed
            through (None: any; see `ServerView`).
        config: the model's config, for the most a server could plausibly run it at
            (None: claims are bounded by probation only).
        trial_share: see TRIAL_SHARE.
        repair_wait_s: how long a session waits for a hole in the swarm to be filled.
        receipts: signs and hands over receipts of the servers' work (None: none).
    """

    def __init__(
        self,
        *,
        p2p: P2P,
        node: DHTNode,
        model: str,
        num_blocks: int,
        local_handler: Callable[[], OwnBlocks | None] = lambda: None,
        step_timeout_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        revalidate_delay_s: float = REVALIDATE_DELAY_S,
        weights_hash: str | None = None,
        weights_format: str | None = None,
        config: ModelConfig | None = None,
        trial_share: float = TRIAL_SHARE,
        verify: Mode = "off",
        reputation: Reputation | None = None,
        local_blocks: LocalBlocks | None = None,
        accuse: Callable[[str, Evidence, str], None] | None = None,
        repair_wait_s: float = REPAIR_WAIT_S,
        receipts: ReceiptSender | None = None,
    ) -> None:
        self.repair_wait_s = repair_wait_s
        self.receipts = receipts
        self.verify: Mode = verify
        """How sessions check servers' steps (`volunteer.client.verification`)."""
        self.reputation = reputation or Reputation()
        self.local_blocks = local_blocks
        """Blocks this process can compute itself, checks' arbiter of last resort."""
        self.accuse = accuse
        """Files an accusation of a server found wrong, with its evidence (None: none)."""
        self.p2p = p2p
        self.revalidate_delay_s = revalidate_delay_s
        self.node = node
        self.model = model
        self.num_blocks = num_blocks
        self.step_timeout_s = step_timeout_s
        self.backoff = Backoff()
        self._local_handler = local_handler
        self._clock = clock
        self._snapshot: SwarmSnapshot | None = None
        self._snapshot_at = -float("inf")
        self._refreshing: asyncio.Task[None] | None = None
        self.weights_hash = weights_hash
        self.trial_share = trial_share
        self.measurements = PeerMeasurements(clock=clock)
        self._view = ServerView(
            model=model, weights_hash=weights_hash, config=config, measurements=self.measurements
        )
        self._view.weights_format = weights_format
        self._rng = rng or random.Random()
        forward, backward = self.measurements.timed_forward(self._call_forward), self._call_backward
        if verify != "off":  # checked after the timing: a check is not the server's time
            own, tolerance = frozenset({self.own_peer_id}), tolerance_for_format(weights_format)
            checked = CheckedCalls(
                Verifier(verify, self.reputation, rng=self._rng, tolerance=tolerance, trusted=own),
                forward,
                backward,
                local_span=self._local_span if local_blocks is not None else None,
                plan=self.plan_spread,
            )
            forward, backward = checked.forward, checked.backward
        self._spread = SpreadCalls(
            plan=self.plan_spread,
            forward=forward,
            backward=backward,
            retriable=(*RETRIABLE_ERRORS, WrongOutputError),
            backoff=self.backoff,
            clock=clock,
            banned=self.reputation.banned,
        )

    @property
    def own_peer_id(self) -> str:
        return self.p2p.peer_id.to_base58()

    async def refresh(self, *, max_age_s: float = 0.0) -> SwarmSnapshot:
        """Reads the model's records from the DHT (unless the last read is recent enough)
        and pings the servers not measured yet."""
        if self._snapshot is None or self._clock() - self._snapshot_at > max_age_s:
            self._snapshot = await read_snapshot_on_node(
                self.node, self.model, self.num_blocks, timeout_s=SNAPSHOT_TIMEOUT_S
            )
            self._snapshot_at = self._clock()
            routable = self._view.routable(self._snapshot)
            await self.measurements.measure_rtts(
                self.p2p, routable, own_peer_id=self.own_peer_id, on_failure=self._unreachable
            )
        return self._snapshot

    async def current(self) -> SwarmSnapshot:
        """A view of the swarm to route with: the last one while it is recent; while it
        is merely stale (see SNAPSHOT_STALE_MAX_S), the last one too, as a new one is
        read in the background (from `revalidate_delay_s` on); otherwise a new one,
        waited for."""
        age = self._clock() - self._snapshot_at
        if self._snapshot is None or age > SNAPSHOT_STALE_MAX_S:
            return await self.refresh()
        if age > SNAPSHOT_MAX_AGE_S and (self._refreshing is None or self._refreshing.done()):
            refreshing = self._refresh_quietly(delay_s=self.revalidate_delay_s)
            self._refreshing = asyncio.create_task(refreshing, name="swarm-refresh")
        return self._snapshot

    async def close(self) -> None:
        """Stops a background read of the swarm; sends the last receipts (idempotent)."""
        if self.receipts is not None:
            await self.receipts.close()
        if self._refreshing is not None:
            self._refreshing.cancel()
            await asyncio.gather(self._refreshing, return_exceptions=True)
            self._refreshing = None

    async def _refresh_quietly(self, *, delay_s: float) -> None:
        try:
            await asyncio.sleep(delay_s)
            await self.refresh()
        except Exception as exc:  # the next session waits for a read if this stays stale
            logger.info("reading the swarm's records in the background failed: %s", exc)

    def candidates(
        self, *, kind: Work = "decode", on_probation: bool = True
    ) -> list[ServerCandidate]:
        """The online servers with our weights, each at the speed routing counts for it
        (measured for `kind` of work, else its claim as a prior: see the module
        docstring), with measured round trips."""
        return self._view.candidates(self._snapshot, kind=kind, on_probation=on_probation)

    def plan_inference(self, start: int, end: int, avoid: frozenset[str]) -> list[RouteHop]:
        """The lowest-latency route over [start, end) among the known online servers
        (newcomers on probation, but in `trial_share` of the routes).

        Raises:
            NoRouteError: the servers not avoided leave a gap.
        """
        is_trial = self._rng.random() < self.trial_share
        candidates = self._with_standing(self.candidates(kind="decode", on_probation=not is_trial))
        return inference_route(candidates, start, end, avoid=avoid)

    def plan_spread(self, start: int, end: int, avoid: frozenset[str]) -> list[RouteHop]:
        """A route over [start, end) drawn by speed among the known online servers
        (a random draw already gives newcomers on probation their share).

        Raises:
            NoRouteError: the servers not avoided leave a gap.
        """
        candidates = self._with_standing(self.candidates(kind="forward"))
        return load_spread_route(candidates, start, end, rng=self._rng, avoid=avoid)

    def _with_standing(self, candidates: list[ServerCandidate]) -> list[ServerCandidate]:
        """The candidates with the standing our checks gave each, for routing to prefer
        the reputable among like speed. Our own server, which the verifier trusts and
        never checks, is put on a par with the best of the others: never held back for
        its empty record, and not making every other server count as less reputable."""
        own = self.own_peer_id
        found = {
            each.peer_id: standing(self.reputation.of(each.peer_id).record)
            for each in candidates
            if each.peer_id != own
        }
        found[own] = max(found.values(), default=ServerCandidate.standing)
        return [dataclasses.replace(each, standing=found[each.peer_id]) for each in candidates]

    async def forward(
        self,
        hidden: torch.Tensor,
        *,
        start: int = 0,
        end: int | None = None,
        adapter: SpanAdapter | None = None,
    ) -> tuple[torch.Tensor, list[TracedHop]]:
        """Hidden [B, S, H] through blocks [start, end) (default: all), no cache, the
        servers drawn by throughput, with a fine-tuning `adapter` for exactly those
        blocks if given; returns the output and the trace for `backward`.

        Raises:
            SessionFailedError: no server left for some block, or too many failures.
        """
        await self.current()
        end = self.num_blocks if end is None else end
        return await self._spread.forward(hidden, start, end, adapter)

    async def backward(self, trace: list[TracedHop], grad_outputs: torch.Tensor) -> Grads:
        """The gradients of a `forward`'s inputs (and adapter) given that of its output.

        Raises:
            SessionFailedError: as for `forward`.
        """
        return await self._spread.backward(trace, grad_outputs)

    async def open_session(
        self,
        *,
        max_length: int,
        batch_size: int = 1,
        verify: Mode | None = None,
        notify: Callable[[str], None] | None = None,
    ) -> SwarmInferenceSession:
        """A fault-tolerant inference session over every block of the model, its steps
        checked as `verify` says (None: as this client's `verify`); `notify` is told
        what it waits for while the swarm repairs a hole.

        Raises:
            SessionFailedError: no route covers the model now (or every one failed).
        """
        await self.current()

        async def open_stream(hop: RouteHop, next_step_id: int) -> InferenceStreamLike:
            stream = await self._open_stream(
                hop, max_length=max_length, batch_size=batch_size, next_step_id=next_step_id
            )
            return self.measurements.timed_stream(hop, stream)

        session = SwarmInferenceSession(
            plan_route=self.plan_inference,
            open_stream=open_stream,
            retriable=RETRIABLE_ERRORS,
            backoff=self.backoff,
            clock=self._clock,
            step_timeout_s=self.step_timeout_s,
            reread=self._reread,
            verifier=self._verifier(verify or self.verify, open_stream, max_length, batch_size),
            repair_wait_s=self.repair_wait_s,
            notify=notify,
            on_hop_end=self.receipts.hop_done if self.receipts is not None else None,
        )
        await session.open(0, self.num_blocks)
        return session

    def _verifier(
        self, mode: Mode, open_stream: OpenStream, max_length: int, batch_size: int
    ) -> Verifier | None:
        if mode == "off":
            return None

        async def open_shadow(start: int, end: int, avoid: frozenset[str]) -> SwarmInferenceSession:
            shadow = SwarmInferenceSession(
                plan_route=lambda s, e, more: self.plan_inference(s, e, more | avoid),
                open_stream=open_stream,
                retriable=RETRIABLE_ERRORS,
                backoff=self.backoff,
                clock=self._clock,
                step_timeout_s=self.step_timeout_s,
                max_failovers=SHADOW_FAILOVERS,
                on_hop_end=self.receipts.hop_done if self.receipts is not None else None,
            )
            await shadow.open(start, end)
            return shadow

        return Verifier(
            mode=mode,
            reputation=self.reputation,
            open_computation=computation_opener(
                open_shadow,
                self._local_span if self.local_blocks is not None else None,
                no_route=(SessionFailedError, *RETRIABLE_ERRORS),
                batch_size=batch_size,
                max_length=max_length,
            ),
            rng=self._rng,
            tolerance=tolerance_for_format(self._view.weights_format),
            trusted=frozenset({self.own_peer_id}),
            accuse=self.accuse,
        )

    async def _local_span(self, start: int, end: int) -> BlockSpan | None:
        assert self.local_blocks is not None
        return await asyncio.to_thread(self.local_blocks, start, end)

    async def _reread(self) -> None:
        """Reads the swarm again now: a route is needed that the current view lacks."""
        refreshing = self._refreshing
        if refreshing is not None and not refreshing.done():
            refreshing.cancel()  # most likely still waiting out its delay
            await asyncio.gather(refreshing, return_exceptions=True)
        await self._refresh_quietly(delay_s=0.0)

    async def _open_stream(
        self, hop: RouteHop, *, max_length: int, batch_size: int, next_step_id: int
    ) -> InferenceStreamLike:
        if hop.peer_id == self.own_peer_id:
            return await self._own_handler().open_local_stream(
                start=hop.start, end=hop.end, max_length=max_length, batch_size=batch_size
            )
        return await self._remote(hop).open_inference(
            max_length=max_length,
            batch_size=batch_size,
            timeout_s=self.step_timeout_s,
            next_step_id=next_step_id,
        )

    async def _call_forward(
        self, hop: RouteHop, hidden: torch.Tensor, adapter: SpanAdapter | None
    ) -> torch.Tensor:
        if hop.peer_id == self.own_peer_id:
            return await self._own_handler().run_forward(hidden, hop.start, hop.end, adapter)
        remote, timeout_s = self._remote(hop), self.step_timeout_s
        output = await remote.forward(hidden, timeout_s=timeout_s, adapter=adapter)
        if self.receipts is not None:
            self.receipts.call_done(hop, "forward", hidden)
        return output

    async def _call_backward(
        self,
        hop: RouteHop,
        hidden: torch.Tensor,
        grad_outputs: torch.Tensor,
        adapter: SpanAdapter | None,
    ) -> Grads:
        if hop.peer_id == self.own_peer_id:
            handler = self._own_handler()
            own = await handler.run_backward(hidden, grad_outputs, hop.start, hop.end, adapter)
            return Grads(*own)
        remote, timeout_s = self._remote(hop), self.step_timeout_s
        grad = await remote.backward(hidden, grad_outputs, timeout_s=timeout_s, adapter=adapter)
        if self.receipts is not None:
            self.receipts.call_done(hop, "backward", hidden)
        return grad

    def _unreachable(self, peer_id: str) -> None:
        self.backoff.record_failure(peer_id, self._clock())

    def _own_handler(self) -> OwnBlocks:
        handler = self._local_handler()
        if handler is None:
            raise PeerUnavailableError("this peer's own block server is not running")
        return handler

    def _remote(self, hop: RouteHop) -> RemoteSpan:
        return RemoteSpan(
            p2p=self.p2p,
            peer_id=PeerID.from_base58(hop.peer_id),
            start=hop.start,
            end=hop.end,
            local_socket=self._local_socket(hop),
        )

    def _local_socket(self, hop: RouteHop) -> str | None:
        """The hop's server's Unix socket, if it runs on this machine (`transport.local_link`)."""
        snapshot = self._snapshot
        if snapshot is None or not 0 <= hop.start < len(snapshot.blocks):
            return None
        info = snapshot.blocks[hop.start].get(hop.peer_id)
        return None if info is None else dialable(info.local_socket, info.boot_id)
