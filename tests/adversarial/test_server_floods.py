"""A block server under floods from hostile peers written with hivemind directly: each cap
answers "busy:" or "bad request:", holds what a stranger may take, and an honest
session meanwhile computes exactly what it computes without the attacker."""

from __future__ import annotations

import asyncio
import dataclasses
import re
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import P2P
from hivemind.proto.p2pd_pb2 import RPCError

import volunteer.transport.framing as framing
from tests.server import (
    LoopThread,
    hidden_states,
    random_span,
    tiny_config,
    wait_until,
    whole_forward,
)
from volunteer.client.remote_span import RemoteSpan
from volunteer.server.caps import DEFAULT_CAPS
from volunteer.server.handler import BlockHandler
from volunteer.transport.p2p_streams import open_stream
from volunteer.transport.protocol import (
    FORWARD_HANDLE,
    INFERENCE_HANDLE,
    PUSH_HANDLE,
    BadRequestError,
    BusyError,
    SessionExpiredError,
)

# hivemind's P2P.create finds its daemon binary with importlib.resources.path().
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
CAPS = dataclasses.replace(
    DEFAULT_CAPS,
    max_sessions=4,
    max_sessions_per_peer=2,
    max_queued_jobs=3,
    max_calls_per_peer=2,
    max_push_streams_per_peer=2,
)
CACHE_TOKENS = 1024
LINGER_S = 2.0
"""How long a refused stream that its peer holds open lingers (short, for the tests)."""
"""Room for every session the caps allow: the caps, not the cache budget, refuse here."""


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    server: P2P
    handler: BlockHandler
    honest: P2P
    attackers: list[P2P]
    expected: torch.Tensor
    """The honest session's output before any attacker came."""

    def remote(self, p2p: P2P) -> RemoteSpan:
        return RemoteSpan(p2p=p2p, peer_id=self.server.peer_id, start=0, end=2)

    def honest_output(self) -> torch.Tensor:
        return self.loop.run(_honest_session(self.remote(self.honest)))

    def assert_honest_unharmed(self) -> None:
        assert torch.equal(self.honest_output(), self.expected)

    def slots_free(self) -> bool:
        handler = self.handler
        slots = (handler.session_slots, handler.call_slots, handler.push_slots)
        return all(each.used == 0 for each in slots)


async def _honest_session(remote: RemoteSpan) -> torch.Tensor:
    stream = await remote.open_inference(max_length=16, batch_size=1)
    try:
        await stream.step(hidden_states(1, 3, seed=5), 0)
        return await stream.step(hidden_states(1, 2, seed=6), 3)
    finally:
        await stream.close()


async def _start() -> tuple[P2P, BlockHandler, P2P, list[P2P]]:
    server = await P2P.create(host_maddrs=LOOPBACK)
    handler = await BlockHandler.create(
        p2p=server,
        span=random_span(tiny_config(num_layers=2)),
        model_name="tiny",
        cache_tokens=CACHE_TOKENS,
        max_batch=2,
        max_chunk=8,
        idle_timeout_s=20.0,
        caps=CAPS,
    )
    maddrs = await server.get_visible_maddrs()
    peers = [await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs) for _ in range(3)]
    return server, handler, peers[0], peers[1:]


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    try:
        server, handler, honest, attackers = loop.run(_start())
        handler.refusals.linger_s = LINGER_S
        expected = loop.run(
            _honest_session(RemoteSpan(p2p=honest, peer_id=server.peer_id, start=0, end=2))
        )
        yield Swarm(loop, server, handler, honest, attackers, expected)
        loop.run(handler.shutdown())
        for p2p in (honest, *attackers, server):
            loop.run(p2p.shutdown())
    finally:
        loop.close()


@pytest.fixture(autouse=True)
def _after_each(swarm: Swarm) -> Iterator[None]:
    yield
    # Whatever the attack held is given back once its streams end.
    assert wait_until(swarm.slots_free)
    swarm.assert_honest_unharmed()


async def _silent_streams(
    attacker: P2P, swarm: Swarm, handle: str, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """Streams that send nothing: each holds whatever the server gives a stream."""
    streams = []
    for _ in range(count):
        _, reader, writer = await open_stream(attacker, swarm.server.peer_id, handle)
        streams.append((reader, writer))
    return streams


async def _refusal(reader: asyncio.StreamReader) -> str:
    """The error a refused stream was answered with; the server then closed it, once the
    linger was over (this peer does not end its side)."""
    marker, body = await asyncio.wait_for(framing.read_frame(reader, max_bytes=1 << 16), 30)
    assert marker == P2P.ERROR_MARKER
    with pytest.raises(asyncio.IncompleteReadError):
        await asyncio.wait_for(reader.readexactly(1), LINGER_S + 10)
    error = RPCError()
    error.ParseFromString(body)
    return error.message


async def _refusals(
    streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]], held: int
) -> list[str]:
    """The errors of the streams the server refused, once all but `held` were refused
    (which ones it holds depends on the order they reached it)."""
    tasks = [asyncio.create_task(_refusal(reader)) for reader, _ in streams]
    try:
        while sum(task.done() for task in tasks) < len(tasks) - held:
            await asyncio.wait(tasks, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        return [task.result() for task in tasks if task.done()]
    finally:
        for task in tasks:
            task.cancel()


def _close_all(streams: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]) -> None:
    for _, writer in streams:
        writer.close()


def test_one_peer_gets_its_share_of_sessions_and_others_still_get_theirs(swarm: Swarm) -> None:
    attacker = swarm.attackers[0]
    remote = swarm.remote(attacker)
    held = [swarm.loop.run(remote.open_inference(max_length=8, batch_size=1)) for _ in range(2)]
    with pytest.raises(BusyError, match=r"^busy: this peer already holds 2 sessions"):
        swarm.loop.run(remote.open_inference(max_length=8, batch_size=1))
    swarm.assert_honest_unharmed()  # another peer still gets a session
    for stream in held:
        swarm.loop.run(stream.close())


def test_the_total_of_sessions_is_capped(swarm: Swarm) -> None:
    held = [
        swarm.loop.run(swarm.remote(attacker).open_inference(max_length=8, batch_size=1))
        for attacker in swarm.attackers
        for _ in range(2)
    ]
    with pytest.raises(BusyError, match=r"^busy: server holds 4 sessions, its most"):
        swarm.honest_output()
    for stream in held:
        swarm.loop.run(stream.close())


def test_silent_streams_hold_no_more_than_the_caps(swarm: Swarm) -> None:
    """Many streams that never send a byte (file descriptor exhaustion): past its share
    the peer's streams are answered busy at once and closed after the linger, not held
    until a timeout."""
    attacker = swarm.attackers[0]
    for handle, what in ((INFERENCE_HANDLE, "sessions"), (PUSH_HANDLE, "push streams")):
        streams = swarm.loop.run(_silent_streams(attacker, swarm, handle, 12))
        refusals = swarm.loop.run(_refusals(streams, held=2))
        assert len(refusals) == 10
        assert all(r.startswith(f"busy: this peer already holds 2 {what}") for r in refusals)
        slots = swarm.handler.session_slots if what == "sessions" else swarm.handler.push_slots
        assert slots.held_by(str(attacker.peer_id)) == 2
        swarm.assert_honest_unharmed()
        _close_all(streams)


def test_one_peer_gets_its_share_of_calls_and_others_still_get_theirs(swarm: Swarm) -> None:
    attacker = swarm.attackers[0]
    streams = swarm.loop.run(_silent_streams(attacker, swarm, FORWARD_HANDLE, 5))
    refusals = swarm.loop.run(_refusals(streams, held=2))
    assert len(refusals) == 3
    expected = "busy: this peer already holds 2 forward/backward calls"
    assert all(r.startswith(expected) for r in refusals)
    hidden = hidden_states(1, 2)
    output = swarm.loop.run(swarm.remote(swarm.honest).forward(hidden, timeout_s=30))
    torch.testing.assert_close(output, whole_forward(swarm.handler.span, hidden, 0, 2))
    _close_all(streams)


def test_a_flood_of_calls_is_answered_busy(swarm: Swarm) -> None:
    first, second = swarm.attackers
    streams = swarm.loop.run(_silent_streams(first, swarm, FORWARD_HANDLE, 2))
    assert wait_until(lambda: swarm.handler.call_slots.held_by(str(first.peer_id)) == 2)
    more = swarm.loop.run(_silent_streams(second, swarm, FORWARD_HANDLE, 3))
    refusals = swarm.loop.run(_refusals(more, held=1))
    assert len(refusals) == 2
    assert all(r.startswith("busy: server holds 3 forward/backward calls") for r in refusals)
    with pytest.raises(BusyError, match="forward/backward calls"):
        swarm.loop.run(swarm.remote(swarm.honest).forward(hidden_states(1, 2), timeout_s=30))
    swarm.assert_honest_unharmed()  # inference steps are not queued behind calls
    _close_all(streams + more)


def test_a_stream_that_never_sends_its_request_is_closed_with_a_reason(swarm: Swarm) -> None:
    """Each silent stream holds its slot for the first-message bound, not the idle
    timeout, then hears why it was closed."""
    handler, attacker = swarm.handler, swarm.attackers[0]
    swarm.loop.run(_set_caps(handler, dataclasses.replace(CAPS, first_message_s=1.0)))
    try:
        for handle in (INFERENCE_HANDLE, FORWARD_HANDLE, PUSH_HANDLE):
            streams = swarm.loop.run(_silent_streams(attacker, swarm, handle, 1))
            (refusal,) = swarm.loop.run(_refusals(streams, held=0))
            assert re.match(r"^bad request: no (request|push) within 1(\.\d+)? s", refusal)
            _close_all(streams)
    finally:
        swarm.loop.run(_set_caps(handler, CAPS))


def test_a_long_forward_is_computed_in_slices_charged_to_its_caller(swarm: Swarm) -> None:
    """A forward of many positions holds the compute thread one slice at a time (an
    inference step waits for one slice at most), and the queue weighs its time against
    the peer that sent it."""
    handler, attacker = swarm.handler, swarm.attackers[0]
    swarm.loop.run(_set_caps(handler, dataclasses.replace(CAPS, forward_slice_s=0.0)))
    try:
        hidden = hidden_states(1, 8, seed=9)
        before = handler.compute.jobs_run
        output = swarm.loop.run(swarm.remote(attacker).forward(hidden, timeout_s=30))
        # The smallest slices: one block over one position each.
        assert handler.compute.jobs_run - before == 2 * 8
        torch.testing.assert_close(output, whole_forward(handler.span, hidden, 0, 2))
        assert handler.compute.used_by(str(attacker.peer_id)) > 0
    finally:
        swarm.loop.run(_set_caps(handler, CAPS))


def test_an_oversized_message_is_refused_unread(swarm: Swarm) -> None:
    """A frame whose header claims more than a valid call can be is refused from its
    header: the server never reads (or allocates for) its body."""

    async def send_oversized() -> str:
        peer = swarm.server.peer_id
        _, reader, writer = await open_stream(swarm.attackers[0], peer, FORWARD_HANDLE)
        try:
            huge = (1 << 40).to_bytes(P2P.HEADER_LEN, P2P.BYTEORDER)
            writer.write(P2P.MESSAGE_MARKER + huge + bytes(1 << 16))
            return await _refusal(reader)
        finally:
            writer.close()

    refusal = swarm.loop.run(send_oversized())
    assert refusal.startswith("bad request: a message of 1099511627776 bytes exceeds")


def test_a_backward_longer_than_the_memory_plan_is_refused(swarm: Swarm) -> None:
    handler = swarm.handler
    swarm.loop.run(_set_caps(handler, dataclasses.replace(CAPS, max_backward_tokens=4)))
    try:
        hidden = hidden_states(1, 5)
        with pytest.raises(BadRequestError, match="5 positions exceeds max_backward_tokens 4"):
            swarm.loop.run(swarm.remote(swarm.honest).backward(hidden, hidden, timeout_s=30))
    finally:
        swarm.loop.run(_set_caps(handler, CAPS))


def test_a_session_outliving_its_lifetime_ends_with_a_clear_error(swarm: Swarm) -> None:
    handler = swarm.handler
    swarm.loop.run(_set_caps(handler, dataclasses.replace(CAPS, max_session_s=1.0)))
    opened = time.monotonic()
    try:
        remote = swarm.remote(swarm.attackers[0])
        stream = swarm.loop.run(remote.open_inference(max_length=8, batch_size=1))
    finally:
        swarm.loop.run(_set_caps(handler, CAPS))
    with pytest.raises(SessionExpiredError, match=r"^expired: the session outlived max_sess"):
        while time.monotonic() - opened < 30:  # steps until the lifetime is up
            swarm.loop.run(stream.step(hidden_states(1, 1), 0))
    assert time.monotonic() - opened >= 1.0
    assert wait_until(lambda: len(handler.sessions) == 0)


async def _set_caps(handler: BlockHandler, caps: object) -> None:
    # On the server's loop, between its requests: a test's way of a restart with new caps.
    handler.caps = caps  # type: ignore[assignment]


def test_the_daemon_raises_its_file_limit_to_the_hard_limit() -> None:
    """Each stream a server serves is a socket: the caps bound them, and the daemon
    starts with room for them (not a distro's soft limit of 1024)."""
    script = (
        "import resource\n"
        "from volunteer.daemon.main import raise_file_limit\n"
        "soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)\n"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (min(256, hard), hard))\n"
        "raise_file_limit()\n"
        "print(*resource.getrlimit(resource.RLIMIT_NOFILE))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    soft, hard = map(int, result.stdout.split())
    assert soft == hard or (soft == 10240 and soft < hard)
