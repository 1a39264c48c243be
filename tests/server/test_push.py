"""Servers pushing a step's output to the next server of the route, on real P2P daemons.

Two servers (blocks 0:2 and 2:4 of one random model) that know each other, as servers of
one swarm do, and a client that opens a session on each and drives the streams itself,
so each test chooses what is pushed, copied, lost or malformed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from volunteer.models.model import BlockSpan

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.server import (
    LoopThread,
    hidden_states,
    random_span,
    start_route_servers,
    sub_span,
    tiny_config,
)
from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import PUSH_HANDLE, PeerUnavailableError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MAX_LENGTH = 16
TIMEOUT_S = 10.0
ATOL = 1e-5


@dataclasses.dataclass
class Pair:
    loop: LoopThread
    full: BlockSpan
    first: BlockHandler
    second: BlockHandler
    p2ps: list[P2P]
    client: P2P

    def open(self, handler: BlockHandler, start: int, end: int) -> InferenceStream:
        peer_id = handler._p2p.peer_id  # type: ignore[union-attr]  # running handlers have one
        remote = RemoteSpan(p2p=self.client, peer_id=peer_id, start=start, end=end)
        return self.loop.run(remote.open_inference(max_length=MAX_LENGTH, batch_size=1))

    def local(self, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
        with torch.no_grad():
            return sub_span(self.full, start, end)(hidden)


async def _start(full: BlockSpan) -> tuple[list[P2P], list[BlockHandler], P2P]:
    servers, client = await start_route_servers(full, [(0, 2), (2, 4)])
    return [p2p for p2p, _ in servers], [handler for _, handler in servers], client


@pytest.fixture(scope="module")
def pair() -> Iterator[Pair]:
    loop = LoopThread()
    full = random_span(tiny_config())
    try:
        p2ps, (first, second), client = loop.run(_start(full))
        yield Pair(loop, full, first, second, p2ps, client)
        for handler in (first, second):
            loop.run(handler.shutdown())
        for p2p in [client, *p2ps]:
            loop.run(p2p.shutdown())
    finally:
        loop.close()


def _push_to(stream: InferenceStream) -> list[wire.NextHop]:
    return [stream.push_target]


def _until_pushed(pair: Pair, first: InferenceStream, second: InferenceStream) -> int:
    """Steps position 0 (rewinding each time) until the first server's link to the second
    is open and it pushes; returns the step id of that pushed step."""
    hidden = hidden_states(1, 2, seed=3)
    for step_id in range(1, 200):
        output = pair.loop.run(
            first.step(hidden, 0, TIMEOUT_S, step_id=step_id, push_to=_push_to(second))
        )
        if first.pushed:
            return step_id
        # Not pushed: the client sends the step on itself, as a session does.
        pair.loop.run(second.step(output, 0, TIMEOUT_S, step_id=step_id))
        time.sleep(0.01)
    raise AssertionError("the first server never pushed to the second")


def test_a_pushed_step_is_answered_without_the_client_sending_it(pair: Pair) -> None:
    first, second = pair.open(pair.first, 0, 2), pair.open(pair.second, 2, 4)
    # Counted before: the push may be run before the first server's answer is back here.
    pushed_before = pair.second.stats.pushed_steps
    step_id = _until_pushed(pair, first, second)
    began = time.monotonic()
    # Nothing is sent to the second server: its answer can only come from the push.
    output = pair.loop.run(second.step(torch.zeros(1, 2, 64), 0, TIMEOUT_S, await_push_s=5.0))
    assert time.monotonic() - began < 2.0
    assert pair.second.stats.pushed_steps == pushed_before + 1
    expected = pair.local(pair.local(hidden_states(1, 2, seed=3), 0, 2), 2, 4)
    assert torch.allclose(output, expected, atol=ATOL)
    hidden = hidden_states(1, 2, seed=4)
    nxt = pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=step_id + 1))
    assert torch.allclose(nxt, pair.local(hidden, 2, 4), atol=ATOL)
    for stream in (first, second):
        pair.loop.run(stream.close())


def test_a_step_already_run_is_not_answered_again(pair: Pair) -> None:
    second = pair.open(pair.second, 2, 4)
    hidden = hidden_states(1, 2, seed=5)
    pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=7))
    with pytest.raises(PeerUnavailableError, match="no reply"):
        pair.loop.run(second.step(hidden, 0, 0.5, step_id=7))
    # The client gave up on the stream; the server frees the session.
    assert _settles(pair.second)


def test_a_lost_push_costs_the_grace_time_not_the_output(pair: Pair) -> None:
    second = pair.open(pair.second, 2, 4)
    hidden = hidden_states(1, 2, seed=6)
    began = time.monotonic()
    # No push is on its way: after the grace time, the step is sent after all.
    output = pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=1, await_push_s=0.2))
    assert time.monotonic() - began >= 0.2
    assert torch.allclose(output, pair.local(hidden, 2, 4), atol=ATOL)
    pair.loop.run(second.close())


def test_a_push_to_a_peer_that_cannot_be_reached_is_skipped(pair: Pair) -> None:
    first = pair.open(pair.first, 0, 2)
    nowhere = wire.NextHop(peer_id=pair.client.peer_id.to_base58(), session_id="x")
    hidden = hidden_states(1, 2, seed=7)
    for step_id in (1, 2, 3):
        output = pair.loop.run(first.step(hidden, 0, TIMEOUT_S, step_id=step_id, push_to=[nowhere]))
        assert torch.allclose(output, pair.local(hidden, 0, 2), atol=ATOL)
        assert not first.pushed
    pair.loop.run(first.close())


def _push_frame(meta: wire.StepRequest | bytes, *tensors: runtime_pb2.Tensor) -> bytes:
    raw = wire.pack_metadata(meta) if isinstance(meta, wire.StepRequest) else meta
    return framing.encode_frame(runtime_pb2.ExpertRequest(metadata=raw, tensors=list(tensors)))


def test_bad_pushes_are_dropped_and_the_session_carries_on(pair: Pair) -> None:
    second = pair.open(pair.second, 2, 4)
    sid = second.session_id
    good = framing.pack_tensor(hidden_states(1, 2, seed=8))
    bad_frames = [
        P2P.MESSAGE_MARKER + (3).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"\xff\xff\xff",
        _push_frame(b"\xc1garbage", good),
        _push_frame(wire.StepRequest(session_id="nobody", step_id=1), good),
        _push_frame(wire.StepRequest(session_id=sid, step_id=0), good),
        _push_frame(wire.StepRequest(session_id=sid, step_id=1, is_close=True)),
        _push_frame(wire.StepRequest(session_id=sid, step_id=1)),
        _push_frame(
            wire.StepRequest(session_id=sid, step_id=1), framing.pack_tensor(torch.ones(1, 2, 5))
        ),
        _push_frame(wire.StepRequest(session_id=sid, step_id=1, start_pos=9), good),
    ]
    pushed_before = pair.second.stats.pushed_steps

    async def send_then_break_framing() -> bytes:
        peer_id = pair.second._p2p.peer_id  # type: ignore[union-attr]
        _, reader, writer = await pair.client.call_binary_stream_handler(peer_id, PUSH_HANDLE)
        for frame in bad_frames:
            writer.write(frame)
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"\x07")  # no such marker: the server ends the link
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), TIMEOUT_S)
        finally:
            writer.close()

    assert pair.loop.run(send_then_break_framing()) == b""
    assert pair.second.stats.pushed_steps == pushed_before
    hidden = hidden_states(1, 2, seed=9)
    output = pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=1))
    assert torch.allclose(output, pair.local(hidden, 2, 4), atol=ATOL)
    pair.loop.run(second.close())


def _settles(handler: BlockHandler) -> bool:
    deadline = time.monotonic() + 5
    while handler.sessions.cache_tokens_left != 64 and time.monotonic() < deadline:
        time.sleep(0.05)
    return handler.sessions.cache_tokens_left == 64
