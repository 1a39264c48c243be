"""What a client measured of each server: its round trip and its compute time per block.

Claims in records are the author's word; these are the client's own timings, which
routing prefers (`volunteer.scheduler.claims`). Two kinds of compute time are kept, each
an exponentially weighted moving average (EWMA) so a server that slows down is seen to:

- per block of a decode step (one position per row), from the inference streams: what an
  inference route costs per token;
- per block and token of a forward call, from the spread calls: what training traffic
  costs (a forward of many tokens is far cheaper per token than decoding).

A sample is the call's wall time less the measured round trip (the least seen), but never
less than `MIN_COMPUTE_SHARE` of it: a round trip too noisy to tell apart from the compute
is charged to the server, and a server that answers pings slowly to look fast gains a
bounded factor, not an unbounded one. A step that the previous server pushed here
(`await_push_s`) was sent before the client asked, so nothing is subtracted: its time
overstates the compute, which errs against the server, never for it. Failed calls are
not samples; the back-off deals with them. The table is bounded: a swarm of Sybils
cannot grow it without limit.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import torch
from hivemind.p2p import P2P, PeerID

from volunteer.client.remote_span import ping
from volunteer.client.stream_types import InferenceStreamLike
from volunteer.models.adapters import SpanAdapter
from volunteer.scheduler.routing import RouteHop
from volunteer.transport.protocol import BusyError, PeerUnavailableError, SessionExpiredError

logger = logging.getLogger(__name__)

EWMA_WEIGHT = 0.3
"""Weight of a new sample: a few steps of a session are enough to follow a change."""
MAX_PEERS = 4096
"""Peers remembered; the least recently measured is forgotten first."""
MIN_COMPUTE_SHARE = 0.5
"""The least share of a call's time counted as the server's compute."""
PING_S = 3.0
"""How long a ping may take."""
PINGS = 2
"""Pings to a server first seen: its round trip is the least of them."""
MIN_BLOCK_S = 1e-6
"""Floor of a per-block time (a call timed at 0 s by a coarse clock)."""

Forward = Callable[[RouteHop, torch.Tensor, SpanAdapter | None], Awaitable[torch.Tensor]]


@dataclasses.dataclass
class _Timings:
    rtt_s: float | None = None
    step_block_s: float | None = None
    """Seconds per block of a decode step."""
    token_block_s: float | None = None
    """Seconds per block per token of a forward call."""


def _ewma(old: float | None, sample: float) -> float:
    return sample if old is None else (1 - EWMA_WEIGHT) * old + EWMA_WEIGHT * sample


class PeerMeasurements:
    """Per-peer round trips and compute times (see the module docstring).

    Args:
        clock: monotonic seconds, for timing calls.
        max_peers: peers remembered at most.
    """

    def __init__(self, *, clock: Callable[[], float], max_peers: int = MAX_PEERS) -> None:
        self._clock = clock
        self._max_peers = max_peers
        self._peers: collections.OrderedDict[str, _Timings] = collections.OrderedDict()

    def rtt_s(self, peer_id: str) -> float | None:
        timings = self._peers.get(peer_id)
        return None if timings is None else timings.rtt_s

    def decode_speed(self, peer_id: str) -> float | None:
        """Measured tokens per second per block of decode steps (None: not measured)."""
        timings = self._peers.get(peer_id)
        if timings is None or timings.step_block_s is None:
            return None
        return 1.0 / max(timings.step_block_s, MIN_BLOCK_S)

    def forward_speed(self, peer_id: str) -> float | None:
        """Measured tokens per second per block of forward calls (None: not measured)."""
        timings = self._peers.get(peer_id)
        if timings is None or timings.token_block_s is None:
            return None
        return 1.0 / max(timings.token_block_s, MIN_BLOCK_S)

    def record_rtt(self, peer_id: str, seconds: float) -> None:
        """A round trip (a ping): the least one seen counts, since queueing and setting
        up a connection only ever add to the path's own."""
        timings = self._entry(peer_id)
        seconds = max(seconds, 0.0)
        timings.rtt_s = seconds if timings.rtt_s is None else min(timings.rtt_s, seconds)

    def record_step(self, peer_id: str, *, blocks: int, seconds: float, pushed: bool) -> None:
        """A decode step over `blocks` blocks answered in `seconds` (`pushed`: it was
        pushed here by the previous server, so no round trip is subtracted)."""
        compute_s = seconds if pushed else self._less_rtt(peer_id, seconds)
        timings = self._entry(peer_id)
        timings.step_block_s = _ewma(timings.step_block_s, compute_s / blocks)

    def record_forward(self, peer_id: str, *, blocks: int, tokens: int, seconds: float) -> None:
        """A forward of `tokens` tokens over `blocks` blocks answered in `seconds`."""
        compute_s = self._less_rtt(peer_id, seconds)
        timings = self._entry(peer_id)
        timings.token_block_s = _ewma(timings.token_block_s, compute_s / (blocks * tokens))

    def timed_stream(self, hop: RouteHop, stream: InferenceStreamLike) -> TimedStream:
        """`stream`, its decode steps timed into these measurements."""
        return TimedStream(stream, hop, self, clock=self._clock)

    def timed_forward(self, forward: Forward) -> Forward:
        """`forward` (a call to one hop's server), timed into these measurements."""

        async def timed(
            hop: RouteHop, hidden: torch.Tensor, adapter: SpanAdapter | None
        ) -> torch.Tensor:
            began = self._clock()
            output = await forward(hop, hidden, adapter)
            tokens = hidden.shape[0] * hidden.shape[1]
            seconds = self._clock() - began
            self.record_forward(hop.peer_id, blocks=_blocks(hop), tokens=tokens, seconds=seconds)
            return output

        return timed

    async def measure_rtts(
        self,
        p2p: P2P,
        peers: Iterable[str],
        *,
        own_peer_id: str,
        on_failure: Callable[[str], None],
    ) -> None:
        """Pings the peers whose round trip is not measured yet, all at once; a peer that
        does not answer is handed to `on_failure`."""
        await asyncio.gather(
            *(
                self._ping(p2p, peer_id, own_peer_id, on_failure)
                for peer_id in peers
                if self.rtt_s(peer_id) is None
            )
        )

    async def _ping(
        self, p2p: P2P, peer_id: str, own_peer_id: str, on_failure: Callable[[str], None]
    ) -> None:
        if peer_id == own_peer_id:
            self.record_rtt(peer_id, 0.0)
            return
        try:
            # The first ping to a peer also sets up the connection: only the later ones
            # time the path alone (`record_rtt` keeps the least).
            for _ in range(PINGS):
                self.record_rtt(peer_id, await ping(p2p, PeerID.from_base58(peer_id), PING_S))
        except (PeerUnavailableError, BusyError, SessionExpiredError) as exc:
            logger.info("server %s did not answer a ping: %s", peer_id, exc)
            on_failure(peer_id)

    def _less_rtt(self, peer_id: str, seconds: float) -> float:
        rtt_s = self.rtt_s(peer_id) or 0.0
        return max(seconds - rtt_s, MIN_COMPUTE_SHARE * seconds, 0.0)

    def _entry(self, peer_id: str) -> _Timings:
        timings = self._peers.get(peer_id)
        if timings is None:
            timings = self._peers[peer_id] = _Timings()
            while len(self._peers) > self._max_peers:
                self._peers.popitem(last=False)
        else:
            self._peers.move_to_end(peer_id)
        return timings


def _blocks(hop: RouteHop) -> int:
    return max(hop.end - hop.start, 1)


class TimedStream:
    """An inference stream whose decode steps are timed (`PeerMeasurements.timed_stream`);
    everything else goes straight through to the stream it wraps."""

    inner: InferenceStreamLike

    def __init__(
        self,
        stream: InferenceStreamLike,
        hop: RouteHop,
        measurements: PeerMeasurements,
        *,
        clock: Callable[[], float],
    ) -> None:
        self.inner = stream
        self._hop = hop
        self._measurements = measurements
        self._clock = clock

    def __getattr__(self, name: str) -> Any:
        # Whatever else the session reads of a stream (whether it pushed, where to push
        # to, what it takes), read from the stream itself at the time.
        if name == "inner":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    async def step(self, hidden: torch.Tensor, start_pos: int, **options: Any) -> torch.Tensor:
        """The wrapped stream's step (the same arguments), timed when it decodes."""
        began = self._clock()
        output = await self.inner.step(hidden, start_pos, **options)
        # Only decode steps: a prefill or a replay of many positions says nothing about
        # what the next token costs.
        if hidden.shape[1] == 1:
            self._measurements.record_step(
                self._hop.peer_id,
                blocks=_blocks(self._hop),
                seconds=self._clock() - began,
                pushed=options.get("await_push_s", 0.0) > 0,
            )
        return output

    async def close(self) -> None:
        await self.inner.close()
