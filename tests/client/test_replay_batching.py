"""A failover replays the history in as few steps as the new server takes, not one round
trip per past step, and the outputs stay those of the blocks run locally, rewinds
included. A prompt longer than a server takes in one step goes in several.

Real block servers on 127.0.0.1 (each takes at most `MAX_CHUNK` positions a step); each
stream the session opens is wrapped in a `CountingStream` that records the steps the
session asks of it and passes them on to the real stream.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import PeerID
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, RouteHop, ServerCandidate, inference_route

from tests.server import LoopThread, hidden_states, random_span, start_route_servers, tiny_config
from volunteer.client.inference import SwarmInferenceSession
from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.client.swarm_client import RETRIABLE_ERRORS
from volunteer.transport.protocol import NextHop

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MAX_CHUNK = 8
"""`start_route_servers`'s servers take at most this many positions a step (batch 1)."""
MAX_LENGTH = 32
PREFILL = 5
ATOL = 1e-5
WAIT_S = 60.0


class CountingStream:
    """A real inference stream that records (start_pos, positions) of every step asked."""

    def __init__(self, hop: RouteHop, stream: InferenceStream) -> None:
        self.hop = hop
        self.stream = stream
        self.steps: list[tuple[int, int]] = []

    @property
    def pushed(self) -> bool:
        return self.stream.pushed

    @property
    def push_target(self) -> NextHop | None:
        return self.stream.push_target

    @property
    def max_chunk(self) -> int | None:
        return self.stream.max_chunk

    async def step(self, hidden: torch.Tensor, start_pos: int, **kwargs: object) -> torch.Tensor:
        self.steps.append((start_pos, hidden.shape[1]))
        return await self.stream.step(hidden, start_pos, **kwargs)  # type: ignore[arg-type]

    async def close(self) -> None:
        await self.stream.close()


class Swarm:
    """Three replicas of blocks 0:2 (preferred in the order a, b, d) and one of 2:4."""

    def __init__(self, loop: LoopThread) -> None:
        self.loop = loop
        self.full = random_span(tiny_config())
        spans = [(0, 2), (0, 2), (0, 2), (2, 4)]
        self.servers, self.client = loop.run(start_route_servers(self.full, spans))
        names = ["a", "b", "d", "c"]
        throughputs = [1000.0, 500.0, 100.0, 100.0]
        self.peer_ids = {
            name: p2p.peer_id.to_base58()
            for name, (p2p, _) in zip(names, self.servers, strict=True)
        }
        self.candidates = [
            ServerCandidate(self.peer_ids[name], start, end, throughput)
            for name, (start, end), throughput in zip(names, spans, throughputs, strict=True)
        ]
        self.opened: list[CountingStream] = []

    def kill(self, name: str) -> None:
        p2p, handler = self.servers[list(self.peer_ids).index(name)]
        self.loop.run(handler.shutdown())
        self.loop.run(p2p.shutdown())

    def session(self) -> SwarmInferenceSession:
        def plan_route(start: int, end: int, avoid: frozenset[str]) -> list[RouteHop]:
            return inference_route(self.candidates, start, end, avoid=avoid)

        async def open_stream(hop: RouteHop, next_step_id: int) -> CountingStream:
            peer_id = PeerID.from_base58(hop.peer_id)
            remote = RemoteSpan(p2p=self.client, peer_id=peer_id, start=hop.start, end=hop.end)
            stream = await remote.open_inference(
                max_length=MAX_LENGTH, batch_size=1, timeout_s=WAIT_S, next_step_id=next_step_id
            )
            self.opened.append(CountingStream(hop, stream))
            return self.opened[-1]

        return SwarmInferenceSession(
            plan_route=plan_route,
            open_stream=open_stream,
            retriable=RETRIABLE_ERRORS,
            backoff=Backoff(base_s=600.0),
            clock=time.monotonic,
            step_timeout_s=WAIT_S,
        )

    def stream_of(self, name: str) -> CountingStream:
        (stream,) = [s for s in self.opened if s.hop.peer_id == self.peer_ids[name]]
        return stream

    def close(self) -> None:
        for p2p, handler in self.servers:
            if p2p.is_alive:
                self.loop.run(handler.shutdown())
                self.loop.run(p2p.shutdown())
        self.loop.run(self.client.shutdown())


@pytest.fixture
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    try:
        swarm = Swarm(loop)
        try:
            yield swarm
        finally:
            swarm.close()
    finally:
        loop.close()


def _expected(full: BlockSpan, sequence: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The blocks' output at positions [start, end) of `sequence` (causal: later positions
    do not matter)."""
    with torch.no_grad():
        return full(sequence[:, :end])[:, start:end]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert actual.shape == expected.shape, what
    error = (actual - expected).abs().max().item()
    assert error <= ATOL, f"{what}: max error {error}"


def test_a_long_decode_history_is_replayed_in_few_steps_and_rewinds_hold(swarm: Swarm) -> None:
    session, full, loop = swarm.session(), swarm.full, swarm.loop
    total = 20
    sequence = hidden_states(1, total + 2, seed=70)
    loop.run(session.open(0, 4))
    try:
        # A prefill, then one decode step per position: 16 steps of history on "a".
        cuts = [PREFILL, *range(PREFILL + 1, total + 1)]
        start = 0
        for end in cuts:
            output = loop.run(session.step(sequence[:, start:end], start), timeout_s=WAIT_S)
            _assert_close(output, _expected(full, sequence, start, end), f"step {start}:{end}")
            start = end
        assert len(swarm.stream_of("a").steps) == len(cuts)

        swarm.kill("a")
        output = loop.run(session.step(sequence[:, total : total + 1], total), timeout_s=WAIT_S)
        _assert_close(output, _expected(full, sequence, total, total + 1), "after the failover")

        # The 20 positions went to "b" in ceil(20 / MAX_CHUNK) steps, then the new one.
        assert swarm.stream_of("b").steps == [(0, 8), (8, 8), (16, 4), (total, 1)]
        assert [hop.peer_id for hop in session.route] == [swarm.peer_ids["b"], swarm.peer_ids["c"]]

        # A rewind into the middle of a replayed step: positions 10.. are written anew.
        rewritten = hidden_states(1, 2, seed=71)
        sequence = torch.cat([sequence[:, :10], rewritten], dim=1)
        output = loop.run(session.step(rewritten, 10), timeout_s=WAIT_S)
        _assert_close(output, _expected(full, sequence, 10, 12), "the rewind")

        # The next failover replays the rewound history, not the one "b" was first sent.
        swarm.kill("b")
        last = hidden_states(1, 1, seed=72)
        sequence = torch.cat([sequence, last], dim=1)
        output = loop.run(session.step(last, 12), timeout_s=WAIT_S)
        _assert_close(output, _expected(full, sequence, 12, 13), "after the second failover")
        assert swarm.stream_of("d").steps == [(0, 8), (8, 4), (12, 1)]
        # Only the failed hop was replayed: "c" kept its session through both failovers.
        assert len(session.route_history) == 3
        assert swarm.stream_of("c").steps[-1] == (12, 1)
    finally:
        loop.run(session.close())


def test_a_prompt_longer_than_a_step_goes_in_several(swarm: Swarm) -> None:
    session, full, loop = swarm.session(), swarm.full, swarm.loop
    sequence = hidden_states(1, 2 * MAX_CHUNK + 3, seed=73)
    loop.run(session.open(0, 4))
    try:
        prompt = sequence.shape[1] - 1
        output = loop.run(session.step(sequence[:, :prompt], 0), timeout_s=WAIT_S)
        _assert_close(output, _expected(full, sequence, 0, prompt), "the long prompt")
        output = loop.run(session.step(sequence[:, prompt:], prompt), timeout_s=WAIT_S)
        _assert_close(output, _expected(full, sequence, prompt, prompt + 1), "the next token")
        # Every hop was sent pieces of at most MAX_CHUNK positions (it refuses more).
        assert swarm.stream_of("a").steps == [(0, 8), (8, 8), (16, 2), (18, 1)]
    finally:
        loop.run(session.close())
