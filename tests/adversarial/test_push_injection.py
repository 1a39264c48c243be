"""A hostile peer pushing steps into another client's inference session.

Two honest servers (blocks 0:2 and 2:4 of one random model) and an honest client that
decodes through both, the first server pushing each step's output to the second. A
stranger, a bare hivemind P2P peer that knows the second hop's session id (the worst
case: ids are not secret), pushes its own hidden states into that session before every
step: with no secret, a guessed one, and (as a server of the route could) the right
secret but a step id ahead of the session's. Each push must be refused: the client's
outputs equal those of the same decoding without the attacker. Each refusal ends the
stranger's link and counts against it, until its links are refused outright.
"""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
from collections.abc import Callable, Iterator

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.server import (
    WAIT_S,
    LoopThread,
    hidden_states,
    random_span,
    start_route_servers,
    tiny_config,
)
from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import PUSH_HANDLE

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
MAX_LENGTH = 16
PREFILL = 3
DECODE_STEPS = 4


@dataclasses.dataclass
class Route:
    loop: LoopThread
    first: BlockHandler
    second: BlockHandler
    client: P2P
    stranger: P2P

    def open(self, handler: BlockHandler, start: int, end: int) -> InferenceStream:
        peer_id = handler._p2p.peer_id  # type: ignore[union-attr]  # running handlers have one
        remote = RemoteSpan(p2p=self.client, peer_id=peer_id, start=start, end=end)
        return self.loop.run(remote.open_inference(max_length=MAX_LENGTH, batch_size=1))


@pytest.fixture(scope="module")
def route() -> Iterator[Route]:
    loop = LoopThread()
    try:
        servers, client = loop.run(
            start_route_servers(random_span(tiny_config()), [(0, 2), (2, 4)])
        )
        maddrs = [addr for p2p, _ in servers for addr in loop.run(p2p.get_visible_maddrs())]
        stranger = loop.run(P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs))
        yield Route(loop, servers[0][1], servers[1][1], client, stranger)
        for _, handler in servers:
            loop.run(handler.shutdown())
        for p2p in [stranger, client, *(p2p for p2p, _ in servers)]:
            loop.run(p2p.shutdown())
    finally:
        loop.close()


Attack = Callable[[InferenceStream, int, int], None]
"""Called before each step after the prefill: the target stream, the step id the
session runs next, and the position it starts at."""


def _decode(route: Route, attack: Attack | None) -> list[torch.Tensor]:
    """A prefill and decode steps through both servers, each step pushed from the first
    to the second where the link is up; the second hop's outputs."""
    first, second = route.open(route.first, 0, 2), route.open(route.second, 2, 4)
    outputs, position = [], 0
    chunks = [hidden_states(1, PREFILL, seed=40)]
    chunks += [hidden_states(1, 1, seed=41 + index) for index in range(DECODE_STEPS)]
    for step_id, chunk in enumerate(chunks, start=1):
        if attack is not None and step_id > 1:
            attack(second, step_id, position)
        stepping = first.step(
            chunk, position, WAIT_S, step_id=step_id, push_to=[second.push_target]
        )
        middle = route.loop.run(stepping)
        if first.pushed:
            # The pushed answer is awaited at length; the fallback (zeros) would give
            # another output, so an output equal to the honest one came from the push.
            fallback = torch.zeros_like(middle)
            waiting = second.step(fallback, position, WAIT_S, step_id=step_id, await_push_s=WAIT_S)
            outputs.append(route.loop.run(waiting, timeout_s=3 * WAIT_S))
        else:
            outputs.append(route.loop.run(second.step(middle, position, WAIT_S, step_id=step_id)))
        position += chunk.shape[1]
    for stream in (first, second):
        route.loop.run(stream.close())
    return outputs


def _push_frame(session_id: str, secret: str | None, step_id: int, position: int) -> bytes:
    meta = wire.StepRequest(
        session_id=session_id, start_pos=position, step_id=step_id, push_secret=secret
    )
    hostile = framing.pack_tensor(torch.full((1, 1, tiny_config().hidden_size), 3.0))
    request = runtime_pb2.ExpertRequest(metadata=wire.pack_metadata(meta), tensors=[hostile])
    return framing.encode_frame(request)


def _inject(route: Route, frames: list[bytes], stranger: P2P | None = None) -> list[str]:
    """Writes each of `frames` on a new push link from the stranger; the error each link
    was closed with (every push here must be refused: none is read quietly)."""

    async def send(frame: bytes) -> str:
        peer_id = route.second._p2p.peer_id  # type: ignore[union-attr]
        p2p = stranger or route.stranger
        _, reader, writer = await p2p.call_binary_stream_handler(peer_id, PUSH_HANDLE)
        try:
            writer.write(frame)
            await writer.drain()
            reading = framing.read_frame(reader, max_bytes=1 << 16)
            marker, body = await asyncio.wait_for(reading, WAIT_S)
        finally:
            writer.close()
        assert marker == P2P.ERROR_MARKER
        error = RPCError()
        error.ParseFromString(body)
        return error.message

    return [route.loop.run(send(frame), timeout_s=2 * WAIT_S) for frame in frames]


def test_pushes_without_the_sessions_secret_or_step_are_dropped(route: Route) -> None:
    honest = _decode(route, attack=None)
    pushed_before = route.second.stats.pushed_steps

    def attack(target: InferenceStream, step_id: int, position: int) -> None:
        sid, secret = target.session_id, target.push_target.push_secret
        refusals = _inject(
            route,
            [
                _push_frame(sid, None, step_id, position),
                _push_frame(sid, secrets.token_hex(16), step_id, position),
                _push_frame(sid, "0" * 32, step_id, position),
                # The right secret, as a server of the route holds it, but a step ahead:
                # taken, it would make the session drop the client's next steps as copies.
                _push_frame(sid, secret, step_id + 5, position),
            ],
        )
        assert all(text.startswith("bad request: ") for text in refusals)

    attacked = _decode(route, attack)
    assert len(attacked) == len(honest) == 1 + DECODE_STEPS
    for index, (got, want) in enumerate(zip(attacked, honest, strict=True)):
        assert torch.allclose(got, want, atol=1e-5), f"step {index + 1} differs"
    # The honest pushes still flowed, none of the stranger's were run.
    assert route.second.stats.pushed_steps - pushed_before <= 1 + DECODE_STEPS
    # A few failures in, the stranger was kept out; the first server never was.
    assert route.second.push_penalties.banned_for(str(route.stranger.peer_id)) > 0
    assert route.second.push_penalties.banned_for(str(route.client.peer_id)) == 0


def test_the_right_secret_and_step_are_taken(route: Route) -> None:
    """The check above can fail: the same push with the session's secret and its next
    step id is run, and the client's answer is then the stranger's."""
    first, second = route.open(route.first, 0, 2), route.open(route.second, 2, 4)
    prefill = hidden_states(1, PREFILL, seed=40)
    middle = route.loop.run(first.step(prefill, 0, WAIT_S, step_id=1))
    honest = route.loop.run(second.step(middle, 0, WAIT_S, step_id=1))
    assert honest.shape == (1, PREFILL, tiny_config().hidden_size)
    pushed_before = route.second.stats.pushed_steps
    frame = _push_frame(second.session_id, second.push_target.push_secret, 2, PREFILL)
    # A peer with no failed pushes (the stranger above is kept out by now).
    maddrs = route.loop.run(route.second._p2p.get_visible_maddrs())  # type: ignore[union-attr]
    fresh = route.loop.run(P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs))
    try:
        _send_quietly(route, fresh, frame)
    finally:
        route.loop.run(fresh.shutdown())
    zeros = torch.zeros(1, 1, tiny_config().hidden_size)
    route.loop.run(second.step(zeros, PREFILL, WAIT_S, step_id=2, await_push_s=WAIT_S))
    assert route.second.stats.pushed_steps == pushed_before + 1
    for stream in (first, second):
        route.loop.run(stream.close())


def _send_quietly(route: Route, sender: P2P, frame: bytes) -> None:
    """Writes `frame` on a push link, then breaks the framing: the server reads a link in
    order, so once it ends the link (without an error: the push was taken) the frame was
    handled."""

    async def send() -> bytes:
        peer_id = route.second._p2p.peer_id  # type: ignore[union-attr]
        _, reader, writer = await sender.call_binary_stream_handler(peer_id, PUSH_HANDLE)
        try:
            writer.write(frame + b"\x07")  # no such marker: the server ends the link
            await writer.drain()
            return await asyncio.wait_for(reader.read(), WAIT_S)
        finally:
            writer.close()

    assert route.loop.run(send(), timeout_s=2 * WAIT_S) == b""
