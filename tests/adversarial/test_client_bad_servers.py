"""A hostile server on the route: the client fails over, and its output is the honest one.

The hostile server is a bare hivemind P2P peer that registers our inference handle with a
handler written here: it admits the session like a server, then answers the first step
with an unexplained error, a refusal, garbage, a wrong shape, NaN, a frame claiming a
terabyte, or by hanging up; or it answers the opening itself with a frame far larger
than an acknowledgement, and stalls. It claims the highest throughput for blocks 0:2, so
the route goes through it first; an honest replica of 0:2 and an honest server of 2:4
stand beside it. Each time the session must back the hostile peer off, replay on the
honest replica, and give the same outputs as the blocks run locally.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.p2p.p2p_daemon import P2PContext
from hivemind.proto import runtime_pb2
from hivemind.proto.p2pd_pb2 import RPCError
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, ServerCandidate

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.client.decoding import assert_close, decode_cuts, local_outputs, route_session
from tests.server import (
    WAIT_S,
    LoopThread,
    hidden_states,
    random_span,
    start_route_servers,
    tiny_config,
)
from volunteer.client.inference import SwarmInferenceSession
from volunteer.client.remote_span import RemoteSpan
from volunteer.transport.protocol import FORWARD_HANDLE, INFERENCE_HANDLE, PeerUnavailableError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MAX_LENGTH = 16
PREFILL = 5
TOTAL = 9
HIDDEN = tiny_config().hidden_size
CLAIMED_BYTES = (1 << 30) - 1
"""What the stalling hostile server claims its next frame holds: within the client's old
1 GiB bound for any reply, and far more than a valid reply to what was asked."""
STALL_S = 2 * WAIT_S
"""How long the stalling server then sends nothing: longer than the client's wait, so
only a refusal of the length itself ends that wait in time."""
REFUSED_S = WAIT_S / 3
"""A claimed length must be refused well before the client's wait would end anyway."""


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    full: BlockSpan
    client: P2P
    candidates: list[ServerCandidate]
    hostile: P2P
    mode: list[str]
    """How the hostile server answers the first step (a one-item list the test sets)."""


def _bad_answer(mode: str, hidden: torch.Tensor) -> bytes:
    """The hostile server's answer to a step on `hidden`."""
    if mode == "error":
        return framing.encode_frame(RPCError(message="RuntimeError('\x1b[2Jboom')"))
    if mode == "refusal":
        return framing.encode_frame(RPCError(message="bad request: I do not like you"))
    if mode == "garbage":
        return framing.frame_bytes(b"\xff\xfe\xfd not a protobuf message")
    if mode == "huge frame":
        return P2P.MESSAGE_MARKER + (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
    if mode == "wrong shape":
        output = torch.zeros(1, 1, HIDDEN)
    elif mode == "wrong dtype":
        output = hidden.to(torch.float16)
    elif mode == "nan":
        output = torch.full_like(hidden, float("nan"))
    else:
        raise AssertionError(mode)
    reply = wire.StepReply(session_id="x", length=hidden.shape[1])
    tensors = [framing.pack_tensor(output)]
    return framing.encode_frame(
        runtime_pb2.ExpertResponse(tensors=tensors, metadata=wire.pack_metadata(reply))
    )


async def _claim_and_stall(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Sends the header of a frame of CLAIMED_BYTES, none of which follow, and waits for
    the client to hang up (or STALL_S)."""
    writer.write(P2P.MESSAGE_MARKER + CLAIMED_BYTES.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
    await writer.drain()
    with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
        await asyncio.wait_for(reader.read(), STALL_S)


async def _start_hostile(known: list, mode: list[str]) -> P2P:
    hostile = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=known)

    async def serve(_: P2PContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            await framing.read_frame(reader, max_bytes=1 << 20)  # the opening
            if mode[0] == "huge acknowledgement":
                await _claim_and_stall(reader, writer)
                return
            ack = wire.StepReply(session_id="x", length=0)
            writer.write(
                framing.encode_frame(runtime_pb2.ExpertResponse(metadata=wire.pack_metadata(ack)))
            )
            _, body = await framing.read_frame(reader, max_bytes=1 << 24)
            request = runtime_pb2.ExpertRequest()
            request.ParseFromString(body)
            hidden = framing.unpack_tensor(request.tensors[0], max_numel=1 << 24)
            if mode[0] != "hang up":
                writer.write(_bad_answer(mode[0], hidden))
                await writer.drain()
            await asyncio.sleep(0.2)  # then it goes away
        finally:
            writer.close()

    async def forward(_: P2PContext, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        try:
            await framing.read_frame(reader, max_bytes=1 << 24)  # the request
            await _claim_and_stall(reader, writer)
        finally:
            writer.close()

    await hostile.add_binary_stream_handler(INFERENCE_HANDLE, serve)
    await hostile.add_binary_stream_handler(FORWARD_HANDLE, forward)
    return hostile


async def _start(loop: LoopThread, full: BlockSpan) -> Swarm:
    servers, unused = await start_route_servers(full, [(0, 2), (2, 4)])
    await unused.shutdown()
    known = [addr for p2p, _ in servers for addr in await p2p.get_visible_maddrs()]
    mode = ["error"]
    hostile = await _start_hostile(known, mode)
    known += await hostile.get_visible_maddrs()
    client = await P2P.create(host_maddrs=["/ip4/127.0.0.1/tcp/0"], initial_peers=known)
    candidates = [
        ServerCandidate(p2p.peer_id.to_base58(), start, end, 100.0)
        for (p2p, _), (start, end) in zip(servers, [(0, 2), (2, 4)], strict=True)
    ]
    candidates.append(ServerCandidate(hostile.peer_id.to_base58(), 0, 2, 1000.0))
    swarm = Swarm(loop, full, client, candidates, hostile, mode)
    swarm.servers = servers  # type: ignore[attr-defined]  # kept for the shutdown
    return swarm


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    try:
        swarm = loop.run(_start(loop, random_span(tiny_config())))
        yield swarm
        for p2p, handler in swarm.servers:  # type: ignore[attr-defined]
            loop.run(handler.shutdown())
            loop.run(p2p.shutdown())
        for p2p in (swarm.client, swarm.hostile):
            loop.run(p2p.shutdown())
    finally:
        loop.close()


async def _decode(session: SwarmInferenceSession, hidden: torch.Tensor) -> list[torch.Tensor]:
    await session.open(0, 4)
    try:
        outputs, start = [], 0
        for end in decode_cuts(PREFILL, TOTAL):
            outputs.append(await session.step(hidden[:, start:end], start))
            start = end
        return outputs
    finally:
        await session.close()


@pytest.mark.parametrize(
    "mode",
    [
        "error",
        "refusal",
        "garbage",
        "huge frame",
        "wrong shape",
        "wrong dtype",
        "nan",
        "hang up",
        "huge acknowledgement",
    ],
)
def test_a_hostile_replica_is_backed_off_and_the_output_is_the_honest_one(
    swarm: Swarm, mode: str
) -> None:
    swarm.mode[0] = mode
    backoff = Backoff(base_s=60.0)
    session = route_session(
        swarm.client, swarm.candidates, backoff, max_length=MAX_LENGTH, timeout_s=WAIT_S
    )
    hidden = hidden_states(1, TOTAL, seed=50)

    began = time.monotonic()
    outputs = swarm.loop.run(_decode(session, hidden), timeout_s=3 * WAIT_S)
    took = time.monotonic() - began

    # Every failure is seen at once (a huge claimed length before any of it is read),
    # not when the client's wait for the reply ends.
    assert took < REFUSED_S, f"the session took {took:.1f} s"

    cuts = decode_cuts(PREFILL, TOTAL)
    assert_close(outputs, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    hostile_id = swarm.hostile.peer_id.to_base58()
    if mode == "huge acknowledgement":  # it was refused while opening: never on a route
        assert all(hop.peer_id != hostile_id for route in session.route_history for hop in route)
    else:
        assert session.route_history[0][0].peer_id == hostile_id
    assert all(hop.peer_id != hostile_id for hop in session.route_history[-1])
    assert hostile_id in backoff.avoided(time.monotonic())


def test_a_forward_reply_claiming_more_than_its_request_allows_is_refused_unread(
    swarm: Swarm,
) -> None:
    remote = RemoteSpan(p2p=swarm.client, peer_id=swarm.hostile.peer_id, start=0, end=2)
    hidden = hidden_states(1, PREFILL, seed=51)
    began = time.monotonic()

    with pytest.raises(PeerUnavailableError, match="exceeds"):
        swarm.loop.run(remote.forward(hidden, timeout_s=WAIT_S), timeout_s=3 * WAIT_S)

    took = time.monotonic() - began
    assert took < REFUSED_S, f"the claimed length was refused after {took:.1f} s"
