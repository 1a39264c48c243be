"""Claims against what the client measured, and weights against the client's own, on real
block servers and a real client on 127.0.0.1.

Three in-process servers each hold all blocks of one tiny random model. Each test
announces them under a model name of its own, with the claims and weights hashes it
needs, and routes with a fresh client of that name, so no test sees another's records.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator

import pytest
import torch
from volunteer.scheduler.claims import PROBATION_FACTOR
from volunteer.scheduler.routing import RouteHop, inference_route

from tests.server import LoopThread, hidden_states, random_span, tiny_config
from tests.swarm.block_peers import Peer, server_info, start_peer, stop_peers
from volunteer.client.inference import SessionFailedError
from volunteer.client.swarm_client import SwarmClient
from volunteer.client.swarm_connection import SwarmConnection
from volunteer.swarm.dht_records import announce_on_node
from volunteer.swarm.records import ServerState

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

NUM_BLOCKS = 4
OURS, THEIRS = "a" * 64, "b" * 64
"""Weights hashes: the client's model, and another model published under its name."""
ATOL = 1e-5
TIMEOUT_S = 60.0


@dataclasses.dataclass
class World:
    loop: LoopThread
    full: torch.nn.Module
    servers: list[Peer]
    connection: SwarmConnection

    def announce(
        self,
        server: int,
        model: str,
        *,
        throughput: float,
        weights: str | None = OURS,
        state: ServerState = ServerState.ONLINE,
        dtype: str = "fp32",
    ) -> None:
        peer = self.servers[server]
        info = server_info(
            0,
            NUM_BLOCKS,
            model=model,
            throughput=throughput,
            weights=weights,
            state=state,
            dtype=dtype,
        )
        stored = announce_on_node(peer.node, info, owner=peer.owner, expiration_s=600, timeout_s=10)
        assert self.loop.run(stored, timeout_s=20)

    def client(
        self, model: str, *, trial_share: float = 0.0, weights_format: str | None = None
    ) -> SwarmClient:
        client = self.connection.client(
            model=model,
            num_blocks=NUM_BLOCKS,
            weights_hash=OURS,
            weights_format=weights_format,
            config=tiny_config(),
        )
        client.trial_share = trial_share
        return client

    def run(self, coro: object) -> object:
        return self.connection.loop_thread.run(coro, timeout_s=TIMEOUT_S)  # type: ignore[arg-type]


async def _start(full: torch.nn.Module) -> list[Peer]:
    first = await start_peer(full, 0, NUM_BLOCKS, [], model="tiny")
    maddrs = [str(a) for a in await first.p2p.get_visible_maddrs()]
    others = [await start_peer(full, 0, NUM_BLOCKS, maddrs, model="tiny") for _ in range(2)]
    return [first, *others]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    loop = LoopThread()
    full = random_span(tiny_config(NUM_BLOCKS))
    try:
        servers = loop.run(_start(full), timeout_s=TIMEOUT_S)
        maddrs = [str(a) for a in loop.run(servers[0].p2p.get_visible_maddrs())]
        try:
            with SwarmConnection(maddrs) as connection:
                yield World(loop, full, servers, connection)
        finally:
            loop.run(stop_peers(servers))
    finally:
        loop.close()


async def _decode(client: SwarmClient, steps: int) -> tuple[list[RouteHop], list[float]]:
    """A prefill of 3 positions, then `steps` one-position steps; the route and each
    decode step's wall time as the caller saw it."""
    await client.refresh()
    session = await client.open_session(max_length=16)
    try:
        await session.step(hidden_states(1, 3), 0)
        walls = []
        for position in range(3, 3 + steps):
            began = time.monotonic()
            await session.step(hidden_states(1, 1), position)
            walls.append(time.monotonic() - began)
        return session.route, walls
    finally:
        await session.close()


def _peer(world: World, server: int) -> str:
    return world.servers[server].peer_id


def test_the_client_times_real_steps_and_forwards(world: World) -> None:
    world.announce(0, "timed", throughput=100.0)
    client = world.client("timed")
    measured = client.measurements
    route, walls = world.run(_decode(client, steps=0))
    assert route == [RouteHop(_peer(world, 0), 0, NUM_BLOCKS)]
    assert measured.rtt_s(_peer(world, 0)) is not None  # pinged on the first read
    assert measured.decode_speed(_peer(world, 0)) is None  # a prefill is no decode sample
    route, walls = world.run(_decode(client, steps=4))
    speed = measured.decode_speed(_peer(world, 0))
    assert speed is not None
    # Each sample is a step's time, less the round trip, per block: no more than the
    # slowest step took as the caller saw it, over the blocks.
    assert 1 / speed <= max(walls) / NUM_BLOCKS
    assert measured.forward_speed(_peer(world, 0)) is None
    output, _ = world.run(client.forward(hidden_states(2, 5)))
    assert output.shape == (2, 5, tiny_config().hidden_size)
    assert measured.forward_speed(_peer(world, 0)) is not None


def test_an_inflated_claim_from_a_newcomer_does_not_win_over_a_measured_server(
    world: World,
) -> None:
    model = "inflated"
    world.announce(0, model, throughput=100.0)
    client = world.client(model)
    honest, liar = _peer(world, 0), _peer(world, 1)
    world.run(_decode(client, steps=3))
    measured = client.measurements.decode_speed(honest)
    assert measured is not None
    # A newcomer that claims a thousand times anyone's speed.
    world.announce(1, model, throughput=1e6)
    world.run(client.refresh())
    candidates = client.candidates()
    speeds = {c.peer_id: c.throughput for c in candidates}
    assert speeds == {honest: measured, liar: PROBATION_FACTOR * measured}
    # Loopback round trips differ by noise only: with them equal, the claim alone
    # would decide, and it does not.
    even = [dataclasses.replace(c, rtt_s=0.001) for c in candidates]
    assert inference_route(even, 0, NUM_BLOCKS) == [RouteHop(honest, 0, NUM_BLOCKS)]
    # Once a route has gone through it (here: the honest server is backed off), it counts
    # at what it was measured at, its claim ignored.
    client.backoff.record_failure(honest, time.monotonic())
    route, _ = world.run(_decode(client, steps=3))
    assert route == [RouteHop(liar, 0, NUM_BLOCKS)]
    found = client.measurements.decode_speed(liar)
    assert found is not None and found < 1e6
    assert {c.peer_id: c.throughput for c in client.candidates()}[liar] == found


def test_a_measured_slow_server_loses_to_a_measured_fast_one_whatever_it_claims(
    world: World,
) -> None:
    model = "slow-liar"
    world.announce(0, model, throughput=1e6)
    world.announce(1, model, throughput=1.0)
    client = world.client(model, trial_share=1.0)
    world.run(client.refresh())
    slow, fast = _peer(world, 0), _peer(world, 1)
    # What a session's steps would record of a server that takes a second per step, and
    # of one that takes a millisecond.
    client.measurements.record_step(slow, blocks=NUM_BLOCKS, seconds=1.0, pushed=False)
    client.measurements.record_step(fast, blocks=NUM_BLOCKS, seconds=0.001, pushed=True)
    for _ in range(5):  # trial routes too: a measured server is no newcomer
        assert client.plan_inference(0, NUM_BLOCKS, frozenset()) == [RouteHop(fast, 0, NUM_BLOCKS)]


def _assert_routes_only_through(world: World, client: SwarmClient, peer_id: str) -> None:
    """Sessions, candidates and spread calls all take `peer_id`, trial routes included."""
    for _ in range(3):
        route, _ = world.run(_decode(client, steps=1))
        assert route == [RouteHop(peer_id, 0, NUM_BLOCKS)]
    assert [c.peer_id for c in client.candidates()] == [peer_id]
    for _ in range(20):
        assert client.plan_spread(0, NUM_BLOCKS, frozenset()) == [RouteHop(peer_id, 0, NUM_BLOCKS)]


def test_servers_with_other_weights_never_appear_in_a_route(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    model = "two-models"
    world.announce(0, model, throughput=100.0)
    world.announce(1, model, throughput=1e6, weights=THEIRS)  # another model, same name
    world.announce(2, model, throughput=1e6, weights=None)  # an older peer: unknown
    client = world.client(model, trial_share=1.0)
    ours = _peer(world, 0)
    with caplog.at_level(logging.INFO, logger="volunteer.client.server_view"):
        _assert_routes_only_through(world, client, ours)
    left_out = [r for r in caplog.records if "other weights" in r.getMessage()]
    assert sorted(r.args[0] for r in left_out) == sorted([_peer(world, 1), _peer(world, 2)])
    # Without ours, nothing serves these weights: no route, though both others cover all.
    world.announce(0, model, throughput=100.0, state=ServerState.OFFLINE)
    client.repair_wait_s = 0.0  # nothing will fill this hole: fail at once
    with pytest.raises(SessionFailedError, match="no servers left"):
        world.run(_decode(client, steps=1))


def test_servers_holding_the_weights_in_another_form_never_appear_in_a_route(
    world: World,
) -> None:
    """A client checks servers by recomputing their steps in its own form (q4 here): a
    server of the same weights in float32 would compute other numbers, so no route of
    it mixes forms, however fast the other server claims to be."""
    model = "two-forms"
    world.announce(0, model, throughput=100.0, dtype="q4g32")
    world.announce(1, model, throughput=1e6, dtype="fp32")
    world.announce(2, model, throughput=1e6, dtype="q4g64")
    client = world.client(model, trial_share=1.0, weights_format="q4g32")
    ours = _peer(world, 0)
    _assert_routes_only_through(world, client, ours)
    # A float32 client takes the float32 server only.
    fp32 = world.client(model, trial_share=1.0, weights_format="fp32")
    assert world.run(_decode(fp32, steps=1))[0] == [RouteHop(_peer(world, 1), 0, NUM_BLOCKS)]


def test_a_leaving_server_carries_a_route_only_where_no_other_can(world: World) -> None:
    model = "leaving"
    world.announce(0, model, throughput=100.0)
    world.announce(1, model, throughput=1e3, state=ServerState.LEAVING)
    client = world.client(model)
    route, _ = world.run(_decode(client, steps=1))
    # Faster by its claim, but handing its blocks over: the other server carries the route.
    assert route == [RouteHop(_peer(world, 0), 0, NUM_BLOCKS)]
    world.announce(0, model, throughput=100.0, state=ServerState.OFFLINE)
    route, _ = world.run(_decode(client, steps=1))
    assert route == [RouteHop(_peer(world, 1), 0, NUM_BLOCKS)]
