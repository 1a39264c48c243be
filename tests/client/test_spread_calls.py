"""Forward/backward through the swarm (`SwarmClient.forward` / `backward`) over real
servers on 127.0.0.1: equal to the local blocks, spread over replicas, a bad request
raised, and a server that died between forward and backward routed around."""

from __future__ import annotations

import dataclasses
import itertools
import random
import time
from collections.abc import Iterator

import pytest
import torch
from volunteer.scheduler.routing import Backoff, NoRouteError, RouteHop

from tests.client.test_swarm_client import MODEL
from tests.server import LoopThread, hidden_states, random_span, tiny_config
from tests.swarm.block_peers import LOOPBACK, Peer, start_announced, stop_peers
from volunteer.client.inference import SessionFailedError
from volunteer.client.spread import SpreadCalls, TracedHop
from volunteer.client.swarm_client import SwarmClient
from volunteer.transport.protocol import BadRequestError, PeerUnavailableError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

ATOL = 1e-5
SPANS = {"a": (0, 4), "b": (0, 4), "c": (2, 4)}
"""Two replicas of everything, and the client's own server on the second half."""


@dataclasses.dataclass
class World:
    loop: LoopThread
    full: torch.nn.Module
    peers: dict[str, Peer]
    client: SwarmClient


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    assert LOOPBACK == ["/ip4/127.0.0.1/tcp/0"]
    loop = LoopThread()
    full = random_span(tiny_config())
    try:
        peers = loop.run(start_announced(full, SPANS, model=MODEL), timeout_s=60)
        own = peers["c"]
        client = SwarmClient(
            p2p=own.p2p,
            node=own.node,
            model=MODEL,
            num_blocks=4,
            local_handler=lambda: own.handler,
            step_timeout_s=10.0,
            rng=random.Random(7),
        )
        yield World(loop, full, peers, client)
        for peer in peers.values():
            if peer.p2p.is_alive:
                loop.run(stop_peers([peer]))
    finally:
        loop.close()


def _local(world: World, hidden: torch.Tensor, grad_outputs: torch.Tensor):
    inputs = hidden.clone().requires_grad_(True)
    output = world.full(inputs)
    (grad,) = torch.autograd.grad(output, inputs, grad_outputs)
    return output.detach(), grad


def _forward_backward(
    world: World, hidden: torch.Tensor, grad_outputs: torch.Tensor
) -> tuple[torch.Tensor, list[TracedHop], torch.Tensor]:
    async def both():
        output, trace = await world.client.forward(hidden)
        return output, trace, (await world.client.backward(trace, grad_outputs)).inputs

    return world.loop.run(both(), timeout_s=60)


def test_forward_and_backward_equal_the_local_blocks_and_spread_the_load(world: World) -> None:
    hidden, grad_outputs = hidden_states(2, 5), hidden_states(2, 5, seed=2)
    expected_output, expected_grad = _local(world, hidden, grad_outputs)
    served = {name: peer.handler.stats.requests for name, peer in world.peers.items()}
    first_hops = []
    for _ in range(10):
        output, trace, grad = _forward_backward(world, hidden, grad_outputs)
        assert (output - expected_output).abs().max() <= ATOL
        assert (grad - expected_grad).abs().max() <= ATOL
        assert trace[0].hop.start == 0 and trace[-1].hop.end == 4
        assert all(a.hop.end == b.hop.start for a, b in itertools.pairwise(trace))
        first_hops.append(trace[0].hop.peer_id)
    # Block 0 lives on a and b only: both were drawn, and both did the work.
    assert set(first_hops) == {world.peers["a"].peer_id, world.peers["b"].peer_id}
    assert all(world.peers[n].handler.stats.requests > served[n] for n in ("a", "b"))


def test_a_bad_request_is_raised_and_not_retried(world: World) -> None:
    wrong_width = torch.zeros(1, 2, 7)
    # (A transport glitch in an earlier test may have left a peer in back-off.)
    avoided = world.client.backoff.avoided(0.0)
    with pytest.raises(BadRequestError, match="hidden"):
        world.loop.run(world.client.forward(wrong_width), timeout_s=30)
    assert world.client.backoff.avoided(0.0) == avoided


def test_a_server_leaving_before_the_backward_is_routed_around(world: World) -> None:
    # b stops computing (as while shutting down: every call gets "busy") but stays
    # reachable; a peer that cannot be dialled at all is the end-to-end tests' case
    # (hivemind's stream_open leaks a socket to p2pd when dialing fails in-process).
    hidden, grad_outputs = hidden_states(1, 4, seed=3), hidden_states(1, 4, seed=4)
    expected_output, expected_grad = _local(world, hidden, grad_outputs)
    victim = world.peers["b"]
    for _ in range(20):  # a forward whose first hop ran on b
        output, trace = world.loop.run(world.client.forward(hidden), timeout_s=30)
        if trace[0].hop.peer_id == victim.peer_id:
            break
    else:
        pytest.fail("b was never drawn for block 0")
    assert (output - expected_output).abs().max() <= ATOL
    victim.handler.compute.shutdown()  # its DHT records still say ONLINE
    served = victim.handler.stats.requests

    grad, _ = world.loop.run(world.client.backward(trace, grad_outputs), timeout_s=60)
    assert (grad - expected_grad).abs().max() <= ATOL
    assert victim.peer_id in world.client.backoff.avoided(time.monotonic())
    # Later calls keep off it while it is backed off, and it did no work.
    for _ in range(5):
        output, trace = world.loop.run(world.client.forward(hidden), timeout_s=30)
        assert victim.peer_id not in {t.hop.peer_id for t in trace}
        assert (output - expected_output).abs().max() <= ATOL
    assert victim.handler.stats.requests == served


def test_a_glitch_of_the_only_server_of_a_span_is_tried_again(world: World) -> None:
    """When every server of some blocks failed a moment ago, the call tries them again
    (a reply cut short is likelier than a death), within its failures allowed; a server
    that keeps failing still ends the call, after `max_failures`."""
    full = world.full
    only = RouteHop("only", 0, 4)
    glitches = [1]

    def plan(start: int, end: int, avoid: frozenset[str]) -> list[RouteHop]:
        if "only" in avoid:
            raise NoRouteError("the only server is backed off")
        return [RouteHop("only", start, end)]

    async def forward(hop: RouteHop, hidden: torch.Tensor, adapter) -> torch.Tensor:
        if glitches[0]:
            glitches[0] -= 1
            raise PeerUnavailableError("reply cut short")
        with torch.no_grad():
            return full(hidden)

    async def backward(hop, hidden, grad, adapter):
        raise AssertionError("not called")

    def spread(max_failures: int) -> SpreadCalls:
        return SpreadCalls(
            plan=plan,
            forward=forward,
            backward=backward,
            retriable=(PeerUnavailableError,),
            backoff=Backoff(),
            clock=time.monotonic,
            max_failures=max_failures,
        )

    hidden = hidden_states(1, 3)
    output, trace = world.loop.run(spread(2).forward(hidden, 0, 4), timeout_s=30)
    assert [t.hop for t in trace] == [only]
    torch.testing.assert_close(output, _local(world, hidden, hidden)[0], atol=ATOL, rtol=0)
    glitches[0] = 5
    with pytest.raises(SessionFailedError, match="3 server failures"):
        world.loop.run(spread(2).forward(hidden, 0, 4), timeout_s=30)
