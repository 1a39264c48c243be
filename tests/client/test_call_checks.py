"""Checked forward and backward calls over real servers on 127.0.0.1, one of them a drill
that answers wrong: the caller gets the blocks' true outputs and gradients, the cheat is
banned at its first checked call, and an honest server is never found wrong."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import PeerID
from volunteer.models.adapters import AdapterLayout, SpanAdapter
from volunteer.scheduler.routing import RouteHop

from tests.client.test_swarm_client import MODEL
from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from tests.swarm.block_peers import Peer, server_info, start_peer, stop_peers
from volunteer.client.call_checks import CheckedCalls
from volunteer.client.remote_span import RemoteSpan
from volunteer.client.span_calls import Grads
from volunteer.client.swarm_client import SwarmClient
from volunteer.client.verification import Verifier, WrongOutputError
from volunteer.faults import parse_faults
from volunteer.server.drill import Drill
from volunteer.swarm.dht_records import announce_on_node
from volunteer.trust.reputation import Reputation

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

ATOL = 1e-4


@dataclasses.dataclass
class World:
    loop: LoopThread
    full: torch.nn.Module
    peers: dict[str, Peer]


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    loop = LoopThread()
    full = random_span(tiny_config(), seed=5)

    async def start() -> dict[str, Peer]:
        peers: dict[str, Peer] = {}
        maddrs: list[str] = []
        for name in ("client", "honest", "cheat"):
            peers[name] = await start_peer(full, 0, 4, maddrs, model=MODEL)
            maddrs = maddrs or [str(a) for a in await peers[name].p2p.get_visible_maddrs()]
        peers["cheat"].handler.drill = Drill(parse_faults("perturb:1.0:0.05"), seed=3)
        for name in ("honest", "cheat"):  # the client's own blocks are not announced
            info = server_info(0, 4, model=MODEL, throughput=100.0, weights=None)
            peer = peers[name]
            assert await announce_on_node(
                peer.node, info, owner=peer.owner, expiration_s=60, timeout_s=10
            )
        return peers

    try:
        peers = loop.run(start(), timeout_s=60)
        yield World(loop, full, peers)
        loop.run(stop_peers(list(peers.values())), timeout_s=60)
    finally:
        loop.close()


def _local_backward(full: torch.nn.Module, hidden: torch.Tensor, grad: torch.Tensor):
    inputs = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = full(inputs)
        (expected,) = torch.autograd.grad(outputs, inputs, grad)
    return outputs.detach(), expected


def _checked(world: World, *, local: bool, plan=None) -> CheckedCalls:
    client = world.peers["client"].p2p

    def remote(hop: RouteHop) -> RemoteSpan:
        peer_id = PeerID.from_base58(hop.peer_id)
        return RemoteSpan(p2p=client, peer_id=peer_id, start=hop.start, end=hop.end)

    async def forward(hop: RouteHop, hidden: torch.Tensor, adapter=None) -> torch.Tensor:
        return await remote(hop).forward(hidden, timeout_s=30, adapter=adapter)

    async def backward(hop: RouteHop, hidden: torch.Tensor, grad: torch.Tensor, adapter=None):
        return await remote(hop).backward(hidden, grad, timeout_s=30, adapter=adapter)

    async def local_span(start: int, end: int):
        return sub_span(world.full, start, end)

    return CheckedCalls(
        Verifier("all", Reputation()),
        forward,
        backward,
        local_span=local_span if local else None,
        plan=plan or (lambda start, end, avoid: []),
    )


def test_a_wrong_forward_or_backward_bans_its_server_and_a_right_one_passes(
    world: World,
) -> None:
    checked = _checked(world, local=True)
    cheat = RouteHop(world.peers["cheat"].peer_id, 0, 4)
    honest = RouteHop(world.peers["honest"].peer_id, 0, 4)
    hidden, grad = hidden_states(1, 5, seed=2), hidden_states(1, 5, seed=3)
    outputs, expected_grad = _local_backward(world.full, hidden, grad)

    async def run() -> tuple[torch.Tensor, torch.Tensor]:
        with pytest.raises(WrongOutputError, match="forward of blocks 0:4 wrong"):
            await checked.forward(cheat, hidden, None)
        with pytest.raises(WrongOutputError, match="backward of blocks 0:4 wrong"):
            await checked.backward(cheat, hidden, grad, None)
        grads = await checked.backward(honest, hidden, grad, None)
        return await checked.forward(honest, hidden, None), grads.inputs

    output, grad_inputs = world.loop.run(run(), timeout_s=60)
    torch.testing.assert_close(output, outputs, atol=ATOL, rtol=0)
    torch.testing.assert_close(grad_inputs, expected_grad, atol=ATOL, rtol=0)
    reputation = checked.verifier.reputation
    assert reputation.is_banned(cheat.peer_id)
    assert "wrong backward of blocks 0:4" in reputation.of(cheat.peer_id).ban_reason
    assert reputation.of(cheat.peer_id).failed == 2
    assert reputation.of(honest.peer_id).passed == 2 and not reputation.is_banned(honest.peer_id)
    assert checked.verifier.wrong == 2


def test_without_an_arbiter_a_disagreement_sets_the_output_aside_and_bans_nobody(
    world: World,
) -> None:
    honest = RouteHop(world.peers["honest"].peer_id, 0, 4)
    cheat = RouteHop(world.peers["cheat"].peer_id, 0, 4)
    checked = _checked(world, local=False, plan=lambda start, end, avoid: [honest])
    with pytest.raises(WrongOutputError, match="disagree"):
        world.loop.run(checked.forward(cheat, hidden_states(1, 3), None), timeout_s=60)
    assert not checked.verifier.reputation.banned()
    assert checked.verifier.unresolved == 1


def test_the_swarm_clients_checked_calls_give_the_true_result(world: World) -> None:
    own = world.peers["client"]
    client = SwarmClient(
        p2p=own.p2p,
        node=own.node,
        model=MODEL,
        num_blocks=4,
        step_timeout_s=10.0,
        rng=random.Random(1),
        verify="all",
        reputation=Reputation(),
        local_blocks=lambda start, end: sub_span(world.full, start, end),
    )
    hidden, grad = hidden_states(2, 3, seed=8), hidden_states(2, 3, seed=9)
    outputs, expected_grad = _local_backward(world.full, hidden, grad)

    async def run() -> list[tuple[torch.Tensor, torch.Tensor]]:
        results = []
        for _ in range(4):  # the spread draws both servers; the cheat's call is retried
            output, trace = await client.forward(hidden)
            results.append((output, (await client.backward(trace, grad)).inputs))
        return results

    for output, grad_inputs in world.loop.run(run(), timeout_s=120):
        torch.testing.assert_close(output, outputs, atol=ATOL, rtol=0)
        torch.testing.assert_close(grad_inputs, expected_grad, atol=ATOL, rtol=0)
    assert client.reputation.is_banned(world.peers["cheat"].peer_id)
    assert not client.reputation.is_banned(world.peers["honest"].peer_id)


def _lora(seed: int) -> SpanAdapter:
    config = tiny_config()
    layout = AdapterLayout(rank=2, targets=("qkv", "down"), scale=2.0)
    generator = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(s, generator=generator) * 0.1 for s in layout.shapes(config, 4)]
    return SpanAdapter.of(layout, tensors, config)


def test_an_adapted_backward_is_checked_on_its_adapter_gradients_too(world: World) -> None:
    """A server that answers the input gradient right but the adapter's wrong is caught
    (and one that answers both right passes, with the autograd reference's values)."""
    honest = RouteHop(world.peers["honest"].peer_id, 0, 4)
    client = world.peers["client"].p2p
    adapter = _lora(4)

    def checked_calls(*, forge: bool) -> CheckedCalls:
        async def backward(hop, hidden, grad, adapter=None):
            peer_id = PeerID.from_base58(hop.peer_id)
            remote = RemoteSpan(p2p=client, peer_id=peer_id, start=hop.start, end=hop.end)
            grads = await remote.backward(hidden, grad, timeout_s=30, adapter=adapter)
            if not forge:
                return grads
            return Grads(grads.inputs, (grads.adapter[0] * 1.5, *grads.adapter[1:]))

        async def forward(hop, hidden, adapter=None):
            raise AssertionError("not called")

        return CheckedCalls(
            Verifier("all", Reputation()),
            forward,
            backward,
            local_span=lambda start, end: _span_of(world, start, end),
            plan=lambda start, end, avoid: [],
        )

    hidden, grad = hidden_states(1, 5, seed=2), hidden_states(1, 5, seed=3)
    forged = checked_calls(forge=True)
    with pytest.raises(WrongOutputError, match="backward of blocks 0:4 wrong"):
        world.loop.run(forged.backward(honest, hidden, grad, adapter), timeout_s=60)
    right = checked_calls(forge=False)
    grads = world.loop.run(right.backward(honest, hidden, grad, adapter), timeout_s=60)
    assert right.verifier.reputation.of(honest.peer_id).passed == 1
    leaves = [t.clone().requires_grad_(True) for t in adapter.tensors]
    inputs = hidden.clone().requires_grad_(True)
    with torch.enable_grad():
        outputs = world.full(inputs, adapter=SpanAdapter(adapter.layout, tuple(leaves)))
        expected = torch.autograd.grad(outputs, [inputs, *leaves], grad)
    torch.testing.assert_close(grads.inputs, expected[0], atol=ATOL, rtol=1e-4)
    for actual, reference in zip(grads.adapter, expected[1:], strict=True):
        torch.testing.assert_close(actual, reference, atol=ATOL, rtol=1e-4)


async def _span_of(world: World, start: int, end: int):
    return sub_span(world.full, start, end)


def test_a_drilled_server_is_caught_on_an_adapted_forward(world: World) -> None:
    checked = _checked(world, local=True)
    cheat = RouteHop(world.peers["cheat"].peer_id, 0, 4)
    with pytest.raises(WrongOutputError, match="forward of blocks 0:4 wrong"):
        world.loop.run(checked.forward(cheat, hidden_states(1, 4), _lora(5)), timeout_s=60)
