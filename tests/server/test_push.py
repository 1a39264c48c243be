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
from hivemind.proto.p2pd_pb2 import RPCError
from volunteer.models.model import BlockSpan

import volunteer.transport.framing as framing
import volunteer.transport.protocol as wire
from tests.server import (
    WAIT_S,
    LoopThread,
    hidden_states,
    random_span,
    start_route_servers,
    step_until_pushed,
    sub_span,
    tiny_config,
    wait_until,
)
from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.server.caps import max_step_bytes
from volunteer.server.handler import BlockHandler
from volunteer.server.penalty_box import PenaltyBox
from volunteer.transport.p2p_streams import open_stream
from volunteer.transport.protocol import INFERENCE_HANDLE, PUSH_HANDLE

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


def test_a_pushed_step_is_answered_without_the_client_sending_it(pair: Pair) -> None:
    first, second = pair.open(pair.first, 0, 2), pair.open(pair.second, 2, 4)
    # Counted before: the push may be run before the first server's answer is back here.
    pushed_before = pair.second.stats.pushed_steps
    step_id = step_until_pushed(pair.loop, first, second, hidden_states(1, 2, seed=3))
    # Nothing is sent to the second server unless no answer comes within the grace time,
    # and then zeros, which give another output: this answer can only come from the push.
    waiting = second.step(torch.zeros(1, 2, 64), 0, WAIT_S, await_push_s=WAIT_S)
    output = pair.loop.run(waiting, timeout_s=3 * WAIT_S)
    assert pair.second.stats.pushed_steps == pushed_before + 1
    expected = pair.local(pair.local(hidden_states(1, 2, seed=3), 0, 2), 2, 4)
    assert torch.allclose(output, expected, atol=ATOL)
    hidden = hidden_states(1, 2, seed=4)
    nxt = pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=step_id + 1))
    assert torch.allclose(nxt, pair.local(hidden, 2, 4), atol=ATOL)
    for stream in (first, second):
        pair.loop.run(stream.close())


def test_replies_and_pushes_through_p2p_pay_the_owners_upload_cap(pair: Pair) -> None:
    upload = pair.first.upload
    first, second = pair.open(pair.first, 0, 2), pair.open(pair.second, 2, 4)
    sent_before = upload.sent_bytes
    hidden = hidden_states(1, 2, seed=5)
    step_id = step_until_pushed(pair.loop, first, second, hidden)
    # A reply per step, and the push of the last: each holds 2 x 64 float32 numbers.
    assert upload.sent_bytes - sent_before >= (step_id + 1) * hidden.numel() * 4
    # Owed half a second under a cap (as after a burst): the next reply waits for it.
    upload.set_rate(0.1)
    waited_before = upload.waited_s
    upload.free_at = time.monotonic() + 0.5
    try:
        output = pair.loop.run(first.step(hidden, 0, TIMEOUT_S, step_id=step_id + 1))
    finally:
        upload.set_rate(None)
    assert upload.waited_s - waited_before >= 0.4
    assert torch.allclose(output, pair.local(hidden, 0, 2), atol=ATOL)
    for stream in (first, second):
        pair.loop.run(stream.close())


def _step_frame(session_id: str, hidden: torch.Tensor, step_id: int) -> bytes:
    meta = wire.StepRequest(session_id=session_id, start_pos=0, step_id=step_id)
    request = runtime_pb2.ExpertRequest(
        metadata=wire.pack_metadata(meta), tensors=[framing.pack_tensor(hidden)]
    )
    return framing.encode_frame(request)


async def _read_output(reader: asyncio.StreamReader) -> torch.Tensor:
    marker, body = await asyncio.wait_for(framing.read_frame(reader, max_bytes=1 << 20), WAIT_S)
    assert marker == P2P.MESSAGE_MARKER
    reply = runtime_pb2.ExpertResponse()
    reply.ParseFromString(body)
    (output,) = reply.tensors
    return framing.unpack_tensor(output, max_numel=1 << 20)


def test_a_step_already_run_is_not_answered_again(pair: Pair) -> None:
    """Replies come in the order of the steps: the reply after a copy of step 7 is step 8's."""
    hidden, longer = hidden_states(1, 2, seed=5), hidden_states(1, 3, seed=10)

    async def send_a_copy_between_two_steps() -> list[torch.Tensor]:
        peer_id = pair.second._p2p.peer_id  # type: ignore[union-attr]
        _, reader, writer = await open_stream(pair.client, peer_id, INFERENCE_HANDLE)
        try:
            opening = wire.OpenSessionRequest(
                start=2, end=4, session_id="copied", max_length=MAX_LENGTH, batch_size=1
            )
            writer.write(
                framing.encode_frame(
                    runtime_pb2.ExpertRequest(metadata=wire.pack_metadata(opening))
                )
            )
            await asyncio.wait_for(framing.read_frame(reader, max_bytes=1 << 20), WAIT_S)
            writer.write(_step_frame("copied", hidden, step_id=7))
            outputs = [await _read_output(reader)]
            writer.write(_step_frame("copied", hidden, step_id=7))  # a copy: not answered
            writer.write(_step_frame("copied", longer, step_id=8))
            outputs.append(await _read_output(reader))
            return outputs
        finally:
            writer.close()  # the client goes away without closing its session

    seventh, next_reply = pair.loop.run(send_a_copy_between_two_steps())
    assert torch.allclose(seventh, pair.local(hidden, 2, 4), atol=ATOL)
    assert next_reply.shape == longer.shape
    assert torch.allclose(next_reply, pair.local(longer, 2, 4), atol=ATOL)
    # The client dropped the stream; the server frees the session.
    assert _settles(pair.second)


def test_a_lost_push_costs_the_grace_time_not_the_output(pair: Pair) -> None:
    second = pair.open(pair.second, 2, 4)
    hidden = hidden_states(1, 2, seed=6)
    began = time.monotonic()
    # No push is on its way: after the grace time, the step is sent after all. (A lower
    # bound: a loaded machine can only make the wait longer.)
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


async def _push_link(pair: Pair, frames: list[bytes], sender: P2P | None = None) -> str | None:
    """Writes `frames` on a new push link to the second server: the error it closed the
    link with, or None if it read them all without one."""
    peer_id = pair.second._p2p.peer_id  # type: ignore[union-attr]
    p2p = sender or pair.client
    _, reader, writer = await p2p.call_binary_stream_handler(peer_id, PUSH_HANDLE)
    try:
        for frame in frames:
            writer.write(frame)
        # No such marker: a server still reading ends the link there, without a word.
        writer.write(b"\x07")
        await writer.drain()
        return await _closing_error(reader)
    finally:
        writer.close()


async def _closing_error(reader: asyncio.StreamReader) -> str | None:
    """The error frame a link was closed with (None: closed without one)."""
    try:
        marker, body = await asyncio.wait_for(
            framing.read_frame(reader, max_bytes=1 << 16), TIMEOUT_S
        )
    except asyncio.IncompleteReadError as exc:
        assert exc.partial == b""
        return None
    assert marker == P2P.ERROR_MARKER
    error = RPCError()
    error.ParseFromString(body)
    return error.message


def test_bad_pushes_are_refused_and_the_session_carries_on(pair: Pair) -> None:
    second = pair.open(pair.second, 2, 4)
    sid, secret = second.session_id, second.push_target.push_secret
    good = framing.pack_tensor(hidden_states(1, 2, seed=8))

    def step(**fields: object) -> wire.StepRequest:
        # With the session's own secret: each frame is refused for its other fault.
        return wire.StepRequest(session_id=sid, push_secret=secret, **fields)  # type: ignore[arg-type]

    bad_frames = [
        P2P.MESSAGE_MARKER + (3).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER) + b"\xff\xff\xff",
        _push_frame(b"\xc1garbage", good),
        _push_frame(wire.StepRequest(session_id="nobody", step_id=1, push_secret=secret), good),
        _push_frame(step(step_id=0), good),
        _push_frame(step(step_id=1, is_close=True)),
        _push_frame(step(step_id=1)),
        _push_frame(step(step_id=1), framing.pack_tensor(torch.ones(1, 2, 5))),
    ]
    # Authentic and well formed, but past the cached positions: taken, then the session
    # drops it as it would the client's own step.
    misplaced = _push_frame(step(step_id=1, start_pos=9), good)
    pushed_before = pair.second.stats.pushed_steps
    # Room for every fault here: the strikes are another test's.
    pair.second.push_penalties = PenaltyBox(free_strikes=len(bad_frames))
    try:
        for frame in bad_frames:
            # The server ends the link at the bad push, with one reason for all.
            reply = pair.loop.run(_push_link(pair, [frame]))
            assert reply == "bad request: a push was refused; link closed"
        assert pair.loop.run(_push_link(pair, [misplaced])) is None
    finally:
        pair.second.push_penalties = PenaltyBox()
    hidden = hidden_states(1, 2, seed=9)
    output = pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=1))
    assert torch.allclose(output, pair.local(hidden, 2, 4), atol=ATOL)
    # The session takes its messages in order of arrival: whatever was pushed was handled
    # before this step, and none of it ran.
    assert pair.second.stats.pushed_steps == pushed_before
    pair.loop.run(second.close())


def test_a_link_ends_at_its_first_bad_push(pair: Pair) -> None:
    """A good push behind a bad one on the same link is never read: a guesser pays a
    new stream per guess."""
    second = pair.open(pair.second, 2, 4)
    sid, secret = second.session_id, second.push_target.push_secret
    good = framing.pack_tensor(hidden_states(1, 1, seed=11))
    guess = wire.StepRequest(session_id=sid, step_id=1, push_secret="0" * 32)
    right = wire.StepRequest(session_id=sid, step_id=1, push_secret=secret)
    pushed_before = pair.second.stats.pushed_steps
    try:
        reply = pair.loop.run(
            _push_link(pair, [_push_frame(guess, good), _push_frame(right, good)])
        )
        assert reply is not None and reply.startswith("bad request: a push was refused")
        hidden = hidden_states(1, 1, seed=12)
        output = pair.loop.run(second.step(hidden, 0, TIMEOUT_S, step_id=1))
        assert torch.allclose(output, pair.local(hidden, 2, 4), atol=ATOL)
        assert pair.second.stats.pushed_steps == pushed_before
    finally:
        pair.second.push_penalties = PenaltyBox()
        pair.loop.run(second.close())


def test_a_peer_whose_pushes_keep_failing_is_kept_out_for_a_while(pair: Pair) -> None:
    second = pair.open(pair.second, 2, 4)
    guess = _push_frame(
        wire.StepRequest(session_id=second.session_id, step_id=1, push_secret="0" * 32),
        framing.pack_tensor(hidden_states(1, 1, seed=13)),
    )
    box = pair.second.push_penalties = PenaltyBox(free_strikes=2, first_ban_s=600.0)
    stranger = str(pair.client.peer_id)
    try:
        for _ in range(3):  # two free strikes, and the third earns the ban
            reply = pair.loop.run(_push_link(pair, [guess]))
            assert reply is not None and reply.startswith("bad request: a push was refused")
        assert box.banned_for(stranger) > 0
        # Kept out: a new link is refused before anything on it is read.
        reply = pair.loop.run(_push_link(pair, [guess]))
        assert reply is not None and reply.startswith("bad request: this peer's pushes failed;")
        # Another server's pushes still come in.
        first = pair.open(pair.first, 0, 2)
        step_until_pushed(pair.loop, first, second, hidden_states(1, 1))
        pair.loop.run(first.close())
    finally:
        pair.second.push_penalties = PenaltyBox()
        pair.loop.run(second.close())


def test_a_push_that_comes_just_after_its_session_closed_is_no_strike(pair: Pair) -> None:
    """The previous server of a route may push a step as the client closes the session:
    with the session's own secret, that is no guess."""
    second = pair.open(pair.second, 2, 4)
    sid, secret = second.session_id, second.push_target.push_secret
    pair.loop.run(second.close())
    assert wait_until(lambda: pair.second.sessions.find_for_push(sid) is None)
    late = wire.StepRequest(session_id=sid, step_id=1, push_secret=secret)
    frame = _push_frame(late, framing.pack_tensor(hidden_states(1, 1, seed=14)))
    box = pair.second.push_penalties = PenaltyBox(free_strikes=0)
    try:
        assert pair.loop.run(_push_link(pair, [frame])) is None  # read and dropped
        assert box.banned_for(str(pair.client.peer_id)) == 0
    finally:
        pair.second.push_penalties = PenaltyBox()


def test_a_link_that_sends_nothing_is_closed_with_a_reason(pair: Pair) -> None:
    caps = pair.second.caps
    pair.second.caps = dataclasses.replace(caps, first_message_s=0.5)
    try:
        reply = pair.loop.run(_push_link_silent(pair))
    finally:
        pair.second.caps = caps
    assert reply is not None and reply.startswith("bad request: no push within 0.5")
    client = str(pair.client.peer_id)
    assert wait_until(lambda: pair.second.push_slots.held_by(client) == 0)


async def _push_link_silent(pair: Pair) -> str | None:
    peer_id = pair.second._p2p.peer_id  # type: ignore[union-attr]
    _, reader, writer = await pair.client.call_binary_stream_handler(peer_id, PUSH_HANDLE)
    try:
        return await _closing_error(reader)
    finally:
        writer.close()


def _settles(handler: BlockHandler) -> bool:
    """Whether every session of `handler` ends and frees its cache."""
    return wait_until(lambda: handler.sessions.cache_tokens_left == 64)


def test_a_push_longer_than_any_step_ends_the_link_unread(pair: Pair) -> None:
    # The header alone says too much: the server must not wait for (or buffer) the body.
    length = max_step_bytes(pair.second) + 1

    async def announce_a_long_push() -> bytes:
        peer_id = pair.second._p2p.peer_id  # type: ignore[union-attr]
        _, reader, writer = await pair.client.call_binary_stream_handler(peer_id, PUSH_HANDLE)
        writer.write(P2P.MESSAGE_MARKER + length.to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER))
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), TIMEOUT_S)
        finally:
            writer.close()

    assert pair.loop.run(announce_a_long_push()) == b""
