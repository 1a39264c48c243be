"""`SwarmClient` over real DHT nodes and block servers on 127.0.0.1: records in, routes
out, sessions through remote servers and through this process's own server."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator

import pytest
import torch

from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from tests.swarm.block_peers import Peer, start_peer, stop_peers
from volunteer.client.swarm_client import SNAPSHOT_MAX_AGE_S, SNAPSHOT_STALE_MAX_S, SwarmClient
from volunteer.server.local_stream import LocalInferenceStream
from volunteer.swarm.dht_records import (
    announce_on_node,
)
from volunteer.swarm.records import ServerInfo, ServerState
from volunteer.transport.protocol import BadRequestError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MODEL = "tiny-client"
ATOL = 1e-5
REVALIDATE_DELAY_S = 1.5
"""The stale view's background read waits this long: ten times the test's look at it, so
only a stall of the whole loop could make the read begin before the look."""


@dataclasses.dataclass
class World:
    loop: LoopThread
    full: torch.nn.Module
    peers: list[Peer]


async def _announce(peer: Peer, state: ServerState, throughput: float) -> None:
    info = ServerInfo(
        state=state,
        start=peer.handler.span.start,
        end=peer.handler.span.end,
        throughput=throughput,
        dtype="float32",
        cache_tokens_left=256,
        version="0.1.0",
        model=MODEL,
    )
    assert await announce_on_node(peer.node, info, owner=peer.owner, expiration_s=60, timeout_s=10)


async def _start(full: object) -> list[Peer]:
    first = await start_peer(full, 0, 2, [], model=MODEL)
    maddrs = [str(a) for a in await first.p2p.get_visible_maddrs()]
    peers = [
        first,
        await start_peer(full, 2, 4, maddrs, model=MODEL),
        await start_peer(full, 0, 4, maddrs, model=MODEL),
    ]
    await _announce(peers[0], ServerState.ONLINE, 100.0)
    await _announce(peers[1], ServerState.ONLINE, 100.0)
    # The fastest server of all, but leaving: no route may use it.
    await _announce(peers[2], ServerState.OFFLINE, 10_000.0)
    return peers


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    loop = LoopThread()
    full = random_span(tiny_config())
    try:
        peers = loop.run(_start(full), timeout_s=60)
        yield World(loop, full, peers)
        loop.run(stop_peers(peers))
    finally:
        loop.close()


def _client(world: World, index: int) -> SwarmClient:
    peer = world.peers[index]
    return SwarmClient(
        p2p=peer.p2p,
        node=peer.node,
        model=MODEL,
        num_blocks=4,
        local_handler=lambda: peer.handler,
    )


def _local_decode(world: World, hidden: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    cache = world.full.allocate_cache(batch_size=1, max_length=16)
    outputs, start = [], 0
    with torch.no_grad():
        for end in cuts:
            outputs.append(world.full(hidden[:, start:end], start_pos=start, cache=cache))
            start = end
    return torch.cat(outputs, dim=1)


async def _decode(client: SwarmClient, hidden: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    session = await client.open_session(max_length=16)
    try:
        outputs, start = [], 0
        for end in cuts:
            outputs.append(await session.step(hidden[:, start:end], start))
            start = end
        return torch.cat(outputs, dim=1), session.route
    finally:
        await session.close()


def test_candidates_are_the_online_servers_with_measured_round_trips(world: World) -> None:
    client = _client(world, 1)
    world.loop.run(client.refresh())
    candidates = {c.peer_id: c for c in client.candidates()}
    online = {world.peers[0].peer_id, world.peers[1].peer_id}
    assert set(candidates) == online  # the OFFLINE one is left out
    assert candidates[world.peers[1].peer_id].rtt_s == 0.0  # itself
    measured = candidates[world.peers[0].peer_id].rtt_s
    assert measured is not None and measured > 0  # pinged; an unanswered ping leaves None


def test_a_session_through_another_server_and_our_own_equals_local(world: World) -> None:
    # Peer 0 routes blocks 0:2 to itself (in-process: libp2p cannot dial itself) and
    # 2:4 to peer 1 over the network.
    hidden, cuts = hidden_states(1, 8), [5, 6, 7, 8]
    actual, route = world.loop.run(_decode(_client(world, 0), hidden, cuts))
    assert [(hop.peer_id, hop.start, hop.end) for hop in route] == [
        (world.peers[0].peer_id, 0, 2),
        (world.peers[1].peer_id, 2, 4),
    ]
    assert (actual - _local_decode(world, hidden, cuts)).abs().max() <= ATOL
    # Both servers counted the work, and every session was freed.
    assert all(p.handler.stats.tokens >= 8 for p in world.peers[:2])
    assert all(len(p.handler.sessions) == 0 for p in world.peers)


def test_the_own_server_checks_in_process_requests_like_remote_ones(world: World) -> None:
    handler = world.peers[0].handler
    served = handler.stats.requests

    async def bad_then_good() -> torch.Tensor:
        stream = await LocalInferenceStream.open(
            handler, start=0, end=2, max_length=8, batch_size=1
        )
        with pytest.raises(BadRequestError, match="hidden states must be"):
            await stream.step(torch.zeros(1, 2, 7), 0, timeout_s=10)
        assert len(handler.sessions) == 0  # a failed step ends the session, as remotely
        with pytest.raises(BadRequestError, match="skips past"):
            fresh = await LocalInferenceStream.open(
                handler, start=0, end=2, max_length=8, batch_size=1
            )
            await fresh.step(hidden_states(1, 1), 3, timeout_s=10)
        good = await LocalInferenceStream.open(handler, start=0, end=2, max_length=8, batch_size=1)
        output = await good.step(hidden_states(1, 3), 0, timeout_s=10)
        await good.close()
        return output

    output = world.loop.run(bad_then_good())
    with torch.no_grad():
        expected = sub_span(world.full, 0, 2)(hidden_states(1, 3))
    assert (output - expected).abs().max() <= ATOL
    assert handler.stats.requests == served + 1
    assert len(handler.sessions) == 0


def test_a_stale_view_routes_at_once_and_is_read_again_in_the_background(world: World) -> None:
    now = [1000.0]
    peer = world.peers[1]
    client = SwarmClient(
        p2p=peer.p2p,
        node=peer.node,
        model=MODEL,
        num_blocks=4,
        clock=lambda: now[0],
        revalidate_delay_s=REVALIDATE_DELAY_S,
    )

    async def scenario() -> tuple[float, float, float, float]:
        first = await client.current()  # none yet: read, waited for
        read_at = client._snapshot_at
        now[0] += SNAPSHOT_MAX_AGE_S + 1  # stale: the same view at once, a read behind it
        stale = await client.current()
        assert stale is first and client._snapshot_at == read_at
        assert client._refreshing is not None
        # The read waits a moment, clear of the prefill of the session that asked for it:
        # a loopback read would be done by now, this one has not begun.
        await asyncio.sleep(REVALIDATE_DELAY_S / 10)
        assert not client._refreshing.done() and client._snapshot_at == read_at
        await client._refreshing
        refreshed_at = client._snapshot_at
        now[0] += SNAPSHOT_STALE_MAX_S + 1  # too old: waited for
        await client.current()
        too_old_at = client._snapshot_at
        await client.close()
        return read_at, refreshed_at, too_old_at, now[0]

    read_at, refreshed_at, too_old_at, end = world.loop.run(scenario())
    assert read_at == 1000.0
    assert refreshed_at == 1000.0 + SNAPSHOT_MAX_AGE_S + 1
    assert too_old_at == end
