"""SwarmInferenceSession over real block servers on loopback, against the same blocks run locally.

Servers that must die for real (failover, no replica left) get a small swarm of their own;
the rest share one module-scoped swarm. Every server serves slices of one random model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator

import pytest
import torch
from hivemind.p2p import P2P, PeerID
from volunteer.models.model import BlockSpan
from volunteer.scheduler.routing import Backoff, RouteHop, ServerCandidate, inference_route

from tests.client.decoding import assert_close, decode_cuts, local_outputs
from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from volunteer.client.inference import SessionFailedError, SwarmInferenceSession
from volunteer.client.remote_span import InferenceStream, RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import (
    BadRequestError,
    BusyError,
    PeerUnavailableError,
    SessionExpiredError,
)

# hivemind's P2P.create finds its daemon binary with importlib.resources.path().
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
BATCH = 2
MAX_LENGTH = 32
CACHE_TOKENS = 256
STEP_TIMEOUT_S = 5.0
IDLE_TIMEOUT_S = 1.0
"""The idle timeout of the one server that lets sessions expire."""
HANG_S = 60.0
"""How long a test waits for something that must happen: only bounds a hang."""
PATIENCE = 100.0
"""A patient session's clock counts each real second this many times (see `patient_clock`)."""
RETRIABLE = (PeerUnavailableError, BusyError, SessionExpiredError)
PREFILL = 5
HIDDEN = tiny_config().hidden_size


@dataclasses.dataclass(frozen=True)
class ServerSpec:
    start: int
    end: int
    throughput: float
    """Higher wins the route: the tests choose which replica serves first."""
    cache_tokens: int = CACHE_TOKENS
    idle_timeout_s: float = 60.0


@dataclasses.dataclass
class Server:
    p2p: P2P
    handler: BlockHandler
    candidate: ServerCandidate

    @property
    def peer_id(self) -> str:
        return self.candidate.peer_id

    def hop(self, start: int, end: int) -> RouteHop:
        return RouteHop(self.peer_id, start, end)


@dataclasses.dataclass
class Client:
    """One session, with what it shares with the test: its backoff and every open."""

    session: SwarmInferenceSession
    backoff: Backoff
    opened: list[RouteHop]
    """Every hop the session asked to open, in order (the failed ones too)."""
    rereads: list[float]
    """When the session asked to read the swarm again."""


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    full: BlockSpan
    """The reference: every block, run locally."""
    servers: dict[str, Server]
    client: P2P

    def new_session(
        self,
        *names: str,
        lies: tuple[ServerCandidate, ...] = (),
        joining: tuple[str, ...] = (),
        clock: Callable[[], float] = time.monotonic,
        step_timeout_s: float = STEP_TIMEOUT_S,
        joins_after_s: float = 0.0,
        repair_wait_s: float = 0.0,
        notify: Callable[[str], None] | None = None,
    ) -> Client:
        """A session whose routes may use only the named servers (and `lies` about them);
        the `joining` ones only once the session has read the swarm again, at least
        `joins_after_s` after its first read again."""
        candidates = [self.servers[name].candidate for name in names] + list(lies)
        opened: list[RouteHop] = []
        rereads: list[float] = []

        async def reread() -> None:
            rereads.append(time.monotonic())
            if rereads[-1] - rereads[0] >= joins_after_s:
                candidates.extend(self.servers[name].candidate for name in joining_left)
                joining_left.clear()

        joining_left = list(joining)

        def plan_route(start: int, end: int, avoid: frozenset[str]) -> list[RouteHop]:
            return inference_route(candidates, start, end, avoid=avoid)

        async def open_stream(hop: RouteHop, next_step_id: int) -> InferenceStream:
            opened.append(hop)
            peer_id = PeerID.from_base58(hop.peer_id)
            remote = RemoteSpan(p2p=self.client, peer_id=peer_id, start=hop.start, end=hop.end)
            return await remote.open_inference(
                max_length=MAX_LENGTH,
                batch_size=BATCH,
                timeout_s=STEP_TIMEOUT_S,
                next_step_id=next_step_id,
            )

        # Long enough that a failed peer stays avoided for the whole test.
        backoff = Backoff(base_s=60.0)
        session = SwarmInferenceSession(
            plan_route=plan_route,
            open_stream=open_stream,
            retriable=RETRIABLE,
            backoff=backoff,
            clock=clock,
            step_timeout_s=step_timeout_s,
            reread=reread,
            repair_wait_s=repair_wait_s,
            notify=notify,
        )
        return Client(session=session, backoff=backoff, opened=opened, rereads=rereads)

    def kill(self, name: str) -> None:
        """Stops a server for real: its handler and its P2P daemon."""
        server = self.servers[name]
        self.loop.run(server.handler.shutdown())
        self.loop.run(server.p2p.shutdown())

    def session_counts(self, *names: str, expected: int) -> list[int]:
        """The named servers' open sessions, once all equal `expected` or after `HANG_S`."""

        async def settle() -> list[int]:
            deadline = time.monotonic() + HANG_S
            while True:
                counts = [len(self.servers[name].handler.sessions) for name in names]
                if counts == [expected] * len(names) or time.monotonic() > deadline:
                    return counts
                await asyncio.sleep(0.02)

        return self.loop.run(settle(), timeout_s=2 * HANG_S)


async def _start(loop: LoopThread, full: BlockSpan, specs: dict[str, ServerSpec]) -> Swarm:
    servers: dict[str, Server] = {}
    for name, spec in specs.items():
        # Each joins through the ones before it: servers of one swarm can reach each
        # other, which their pushes down a route need.
        known = [a for server in servers.values() for a in await server.p2p.get_visible_maddrs()]
        p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=known)
        handler = await BlockHandler.create(
            p2p=p2p,
            span=sub_span(full, spec.start, spec.end),
            model_name="tiny",
            cache_tokens=spec.cache_tokens,
            max_batch=4,
            max_chunk=16,
            idle_timeout_s=spec.idle_timeout_s,
            throughput=spec.throughput,
        )
        peer_id = p2p.peer_id.to_base58()
        candidate = ServerCandidate(peer_id, spec.start, spec.end, spec.throughput)
        servers[name] = Server(p2p=p2p, handler=handler, candidate=candidate)
    maddrs = [addr for server in servers.values() for addr in await server.p2p.get_visible_maddrs()]
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    return Swarm(loop=loop, full=full, servers=servers, client=client)


async def _stop(swarm: Swarm) -> None:
    for server in swarm.servers.values():
        await server.handler.shutdown()
    for p2p in [swarm.client, *(server.p2p for server in swarm.servers.values())]:
        await p2p.shutdown()


@pytest.fixture(scope="module")
def loop() -> Iterator[LoopThread]:
    loop = LoopThread()
    try:
        yield loop
    finally:
        loop.close()


@pytest.fixture(scope="module")
def full() -> BlockSpan:
    return random_span(tiny_config())


@pytest.fixture(scope="module")
def swarm(loop: LoopThread, full: BlockSpan) -> Iterator[Swarm]:
    specs = {
        "first": ServerSpec(0, 2, throughput=100.0),
        "second": ServerSpec(2, 4, throughput=100.0),
        # Preferred for 0:2, but too small for any session of BATCH * MAX_LENGTH.
        "cramped": ServerSpec(0, 2, throughput=1000.0, cache_tokens=BATCH * MAX_LENGTH - 1),
        "sleepy": ServerSpec(0, 4, throughput=100.0, idle_timeout_s=IDLE_TIMEOUT_S),
    }
    swarm = loop.run(_start(loop, full, specs))
    yield swarm
    loop.run(_stop(swarm))


@pytest.fixture
def start_swarm(loop: LoopThread, full: BlockSpan) -> Iterator[Callable[..., Swarm]]:
    """Starts a swarm of this test's own, for servers the test kills."""
    started: list[Swarm] = []

    def start(**specs: ServerSpec) -> Swarm:
        started.append(loop.run(_start(loop, full, specs)))
        return started[-1]

    yield start
    for swarm in started:
        loop.run(_stop(swarm))


def patient_clock() -> float:
    """A session judges a pushed step late by its own clock: on this one it waits for a
    push `PATIENCE` times longer than on the real one, so any push that exists wins over
    the client's own copy of the step, however slow a loaded machine makes either."""
    return PATIENCE * time.monotonic()


async def _open_steps_close(
    session: SwarmInferenceSession, hidden: torch.Tensor, cuts: list[int]
) -> list[torch.Tensor]:
    """Opens the session over all 4 blocks, runs the steps, and always closes it."""
    await session.open(0, 4)
    try:
        return await _steps(session, hidden, cuts)
    finally:
        await session.close()


async def _steps(
    session: SwarmInferenceSession, hidden: torch.Tensor, cuts: list[int], start: int = 0
) -> list[torch.Tensor]:
    outputs = []
    for end in cuts:
        outputs.append(await session.step(hidden[:, start:end], start))
        start = end
    return outputs


def test_a_two_server_route_equals_local_decoding(swarm: Swarm) -> None:
    client = swarm.new_session("first", "second")
    hidden, cuts = hidden_states(BATCH, 11, seed=20), decode_cuts(PREFILL, 11)

    actual = swarm.loop.run(_open_steps_close(client.session, hidden, cuts))
    assert_close(actual, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    # Through all four blocks: the first two alone give something else.
    with torch.no_grad():
        assert (actual[0] - sub_span(swarm.full, 0, 2)(hidden[:, :PREFILL])).abs().max() > 0.1
    first, second = swarm.servers["first"], swarm.servers["second"]
    route = [first.hop(0, 2), second.hop(2, 4)]
    assert client.session.route_history == [route]
    assert client.opened == route
    assert swarm.session_counts("first", "second", expected=0) == [0, 0]


def test_each_server_pushes_its_output_down_the_route(swarm: Swarm) -> None:
    first, second = swarm.servers["first"], swarm.servers["second"]
    # The first server opens its link to the second in the background, on a first session's
    # first push: sessions run until one step has come through it.
    deadline = time.monotonic() + HANG_S
    while second.handler.stats.pushed_steps == 0:
        assert time.monotonic() < deadline, "the first server never pushed to the second"
        warm_up = swarm.new_session("first", "second", clock=patient_clock).session
        swarm.loop.run(
            _open_steps_close(warm_up, hidden_states(BATCH, 11, seed=22), decode_cuts(PREFILL, 11))
        )
    pushed_before = second.handler.stats.pushed_steps
    client = swarm.new_session("first", "second", clock=patient_clock)
    hidden, cuts = hidden_states(BATCH, 12, seed=23), decode_cuts(PREFILL, 12)

    actual = swarm.loop.run(_open_steps_close(client.session, hidden, cuts))

    assert_close(actual, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    # Over an open link, the second server ran every step from the first's push, none
    # from the client (which waits for the push, and only then would send the step).
    assert second.handler.stats.pushed_steps - pushed_before == len(cuts)
    assert first.handler.stats.pushed_steps == 0  # nothing comes before the first hop


def test_a_dead_replica_is_replaced_and_replayed(start_swarm: Callable[..., Swarm]) -> None:
    swarm = start_swarm(
        a=ServerSpec(0, 2, throughput=1000.0),
        b=ServerSpec(0, 2, throughput=100.0),
        c=ServerSpec(2, 4, throughput=100.0),
    )
    a, b, c = (swarm.servers[name] for name in "abc")
    client = swarm.new_session("a", "b", "c")
    session = client.session
    hidden, cuts = hidden_states(BATCH, 10, seed=21), decode_cuts(PREFILL, 10)
    swarm.loop.run(session.open(0, 4))
    before = swarm.loop.run(_steps(session, hidden, cuts[:3]))
    assert session.route == [a.hop(0, 2), c.hop(2, 4)]

    swarm.kill("a")
    after = swarm.loop.run(_steps(session, hidden, cuts[3:], start=cuts[2]))

    assert_close(before + after, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    assert session.route_history == [[a.hop(0, 2), c.hop(2, 4)], [b.hop(0, 2), c.hop(2, 4)]]
    assert a.peer_id in client.backoff.avoided(time.monotonic())
    # Only the dead hop was reopened: c kept its session and its cache.
    assert client.opened == [a.hop(0, 2), c.hop(2, 4), b.hop(0, 2)]
    assert swarm.session_counts("b", "c", expected=1) == [1, 1]
    swarm.loop.run(session.close())
    assert swarm.session_counts("b", "c", expected=0) == [0, 0]


def test_a_rewind_is_not_replayed_after_a_failover(start_swarm: Callable[..., Swarm]) -> None:
    swarm = start_swarm(
        a=ServerSpec(0, 2, throughput=1000.0),
        b=ServerSpec(0, 2, throughput=100.0),
        c=ServerSpec(2, 4, throughput=100.0),
    )
    session = swarm.new_session("a", "b", "c").session
    hidden = hidden_states(BATCH, 8, seed=22)
    rewritten = hidden_states(BATCH, 2, seed=23)

    async def before_the_failure() -> None:
        await session.open(0, 4)
        await _steps(session, hidden, [PREFILL, PREFILL + 1, PREFILL + 2])
        await session.step(rewritten, PREFILL)  # rewind: positions PREFILL.. are redone

    swarm.loop.run(before_the_failure())
    swarm.kill("a")
    last = hidden[:, PREFILL + 2 : PREFILL + 3]
    actual = swarm.loop.run(session.step(last, PREFILL + 2))
    swarm.loop.run(session.close())

    with torch.no_grad():
        expected = swarm.full(torch.cat([hidden[:, :PREFILL], rewritten, last], dim=1))
    assert_close([actual], [expected[:, -1:]])
    assert len(session.route_history) == 2


def test_a_busy_server_is_skipped_for_another_replica(swarm: Swarm) -> None:
    cramped, first, second = (swarm.servers[name] for name in ("cramped", "first", "second"))
    client = swarm.new_session("cramped", "first", "second")
    hidden, cuts = hidden_states(BATCH, 7, seed=24), decode_cuts(PREFILL, 7)

    actual = swarm.loop.run(_open_steps_close(client.session, hidden, cuts))
    assert_close(actual, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    # A route's hops open at once: the first try opened second too, and closed it when
    # cramped said busy; the second try opened first and second again.
    assert client.opened == [
        cramped.hop(0, 2),
        second.hop(2, 4),
        first.hop(0, 2),
        second.hop(2, 4),
    ]
    assert client.session.route_history == [[first.hop(0, 2), second.hop(2, 4)]]
    assert client.backoff.avoided(time.monotonic()) == {cramped.peer_id}
    assert swarm.session_counts("cramped", "second", expected=0) == [0, 0]


@pytest.mark.parametrize(
    ("bad_hidden", "reason"),
    [
        (torch.zeros(BATCH, 1, HIDDEN + 1), "hidden size 65, .* hidden size 64"),
        (torch.zeros(BATCH + 1, 1, HIDDEN), "batch 3, .* batch 2"),
        (torch.zeros(BATCH, 1, HIDDEN), "start_pos 6 skips past the 5 positions"),
    ],
)
def test_a_bad_request_is_raised_not_retried(
    swarm: Swarm, bad_hidden: torch.Tensor, reason: str
) -> None:
    first, second = swarm.servers["first"], swarm.servers["second"]
    client = swarm.new_session("first", "second")
    session = client.session
    swarm.loop.run(session.open(0, 4))
    swarm.loop.run(session.step(hidden_states(BATCH, PREFILL, seed=25), 0))

    # Input that cannot be right is refused before it is sent.
    start_pos = PREFILL + 1 if "skips" in reason else PREFILL
    with pytest.raises(BadRequestError, match=reason):
        swarm.loop.run(session.step(bad_hidden, start_pos))

    route = [first.hop(0, 2), second.hop(2, 4)]
    assert session.route == route
    assert session.route_history == [route]
    assert client.opened == route
    assert client.backoff.avoided(time.monotonic()) == frozenset()
    swarm.loop.run(session.close())
    assert swarm.session_counts("first", "second", expected=0) == [0, 0]


def test_a_refusal_while_opening_closes_the_hops_and_tries_elsewhere(swarm: Swarm) -> None:
    first = swarm.servers["first"]
    # "first" claims blocks 2:4 as well, which it does not serve: the route opens 0:2 on it
    # fine, then its 2:4 session is refused. A refusal may be a server's lie: the peer is
    # backed off and the route planned again, which leaves no server for 2:4.
    lie = dataclasses.replace(first.candidate, start=2, end=4)
    client = swarm.new_session("first", lies=(lie,))

    with pytest.raises(SessionFailedError, match="no servers left for blocks 0:4"):
        swarm.loop.run(client.session.open(0, 4))

    assert client.opened == [first.hop(0, 2), first.hop(2, 4)]
    assert swarm.session_counts("first", expected=0) == [0]
    assert client.backoff.avoided(time.monotonic()) == frozenset({first.peer_id})


def test_a_failover_with_no_route_in_view_reads_the_swarm_again(
    start_swarm: Callable[..., Swarm],
) -> None:
    """A replica that joined after the session's view was read is found on a re-read."""
    swarm = start_swarm(
        a=ServerSpec(0, 2, throughput=100.0),
        b=ServerSpec(0, 2, throughput=100.0),
        c=ServerSpec(2, 4, throughput=100.0),
    )
    b, c = swarm.servers["b"], swarm.servers["c"]
    client = swarm.new_session("a", "c", joining=("b",))
    session = client.session
    hidden, cuts = hidden_states(BATCH, 10, seed=23), decode_cuts(PREFILL, 10)
    swarm.loop.run(session.open(0, 4))
    before = swarm.loop.run(_steps(session, hidden, cuts[:3]))
    assert client.rereads == []

    swarm.kill("a")
    after = swarm.loop.run(_steps(session, hidden, cuts[3:], start=cuts[2]))

    assert_close(before + after, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    assert len(client.rereads) == 1
    assert session.route == [b.hop(0, 2), c.hop(2, 4)]
    swarm.loop.run(session.close())


def test_no_replica_left_fails_the_session_quickly(start_swarm: Callable[..., Swarm]) -> None:
    swarm = start_swarm(a=ServerSpec(0, 2, throughput=100.0), c=ServerSpec(2, 4, throughput=100.0))
    # Quickly: on the dead peer's error, not at the end of a step timeout, which is set
    # far past the wait that bounds this test.
    client = swarm.new_session("a", "c", step_timeout_s=100 * HANG_S)
    hidden = hidden_states(BATCH, PREFILL + 1, seed=26)
    swarm.loop.run(client.session.open(0, 4))
    swarm.loop.run(client.session.step(hidden[:, :PREFILL], 0))
    swarm.kill("a")

    with pytest.raises(SessionFailedError, match=r"no servers left for blocks 0:2"):
        swarm.loop.run(client.session.step(hidden[:, PREFILL:], PREFILL), timeout_s=HANG_S)
    assert swarm.servers["a"].peer_id in client.backoff.avoided(time.monotonic())

    swarm.loop.run(client.session.close())
    assert swarm.session_counts("c", expected=0) == [0]


def test_a_session_waits_for_a_hole_to_be_filled_and_says_so(
    start_swarm: Callable[..., Swarm],
) -> None:
    """The only server of 0:2 dies; another takes the blocks over a few seconds later
    (as `volunteer.daemon.hole_watch` does): the session waits, says for which blocks,
    and goes on with the same outputs."""
    swarm = start_swarm(
        a=ServerSpec(0, 2, throughput=100.0),
        b=ServerSpec(0, 2, throughput=100.0),
        c=ServerSpec(2, 4, throughput=100.0),
    )
    notices: list[str] = []
    client = swarm.new_session(
        "a", "c", joining=("b",), joins_after_s=2.0, repair_wait_s=30.0, notify=notices.append
    )
    session = client.session
    hidden, cuts = hidden_states(BATCH, 8, seed=31), decode_cuts(PREFILL, 8)
    swarm.loop.run(session.open(0, 4))
    before = swarm.loop.run(_steps(session, hidden, cuts[:3]))
    swarm.kill("a")
    began = time.monotonic()
    after = swarm.loop.run(_steps(session, hidden, cuts[3:], start=cuts[2]))

    assert 2.0 <= time.monotonic() - began < 10.0
    assert_close(before + after, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    assert notices == [
        "waiting for blocks 0:2 to be served: no server holds them now (up to 30 s more)"
    ]
    assert session.route == [swarm.servers["b"].hop(0, 2), swarm.servers["c"].hop(2, 4)]
    swarm.loop.run(session.close())


def test_a_hole_nobody_fills_fails_the_session_when_the_wait_runs_out(
    start_swarm: Callable[..., Swarm],
) -> None:
    swarm = start_swarm(a=ServerSpec(0, 2, throughput=100.0), c=ServerSpec(2, 4, throughput=100.0))
    notices: list[str] = []
    client = swarm.new_session("a", "c", repair_wait_s=2.0, notify=notices.append)
    swarm.kill("a")
    began = time.monotonic()
    with pytest.raises(SessionFailedError, match=r"no servers left for blocks 0:2 \(of"):
        swarm.loop.run(client.session.open(0, 4))
    assert 2.0 <= time.monotonic() - began < 8.0
    assert len(notices) == 1 and "waiting for blocks 0:2" in notices[0]
    assert len(client.rereads) >= 2  # read again while waiting, not only once


def test_an_expired_session_is_replayed_on_the_same_server(swarm: Swarm) -> None:
    sleepy = swarm.servers["sleepy"]
    client = swarm.new_session("sleepy")
    hidden, cuts = hidden_states(BATCH, 7, seed=27), decode_cuts(PREFILL, 7)
    swarm.loop.run(client.session.open(0, 4))
    before = swarm.loop.run(_steps(client.session, hidden, cuts[:1]))
    assert swarm.session_counts("sleepy", expected=0) == [0]  # the server closed it, idle

    after = swarm.loop.run(_steps(client.session, hidden, cuts[1:], start=cuts[0]))
    swarm.loop.run(client.session.close())

    assert_close(before + after, local_outputs(swarm.full, hidden, cuts, MAX_LENGTH))
    # The client idled; the server did nothing wrong and is not avoided.
    assert client.session.route_history == [[sleepy.hop(0, 4)], [sleepy.hop(0, 4)]]
    assert client.backoff.avoided(time.monotonic()) == frozenset()
    assert swarm.session_counts("sleepy", expected=0) == [0]


def test_close_frees_the_servers_sessions(swarm: Swarm) -> None:
    first, second = swarm.servers["first"], swarm.servers["second"]
    session = swarm.new_session("first", "second").session
    swarm.loop.run(session.open(0, 4))
    swarm.loop.run(session.step(hidden_states(BATCH, PREFILL, seed=28), 0))
    assert swarm.session_counts("first", "second", expected=1) == [1, 1]
    held = [server.handler.sessions.cache_tokens_left for server in (first, second)]
    assert held == [CACHE_TOKENS - BATCH * MAX_LENGTH] * 2

    swarm.loop.run(session.close())

    assert swarm.session_counts("first", "second", expected=0) == [0, 0]
    assert [server.handler.sessions.cache_tokens_left for server in (first, second)] == [
        CACHE_TOKENS
    ] * 2
    assert session.route == []
    with pytest.raises(RuntimeError, match="not open"):
        swarm.loop.run(session.step(hidden_states(BATCH, 1), PREFILL))
