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
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan, ModelEnds

from tests.server import LoopThread, random_span, tiny_config
from tests.swarm.block_peers import LOOPBACK, Peer, start_announced, stop_peers
from volunteer.client.swarm_client import SwarmClient
from volunteer.finetune.blocks import LocalBlocks, SwarmBlocks, causal_loss
from volunteer.finetune.params import AdapterParams, MethodSettings
from volunteer.swarm.dht_records import make_validator
from volunteer.transport.protocol import BadRequestError

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


async def client_peer(known: Peer) -> tuple[P2P, DHTNode]:
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
        peers = loop.run(start_announced(full, SPANS, model=MODEL), timeout_s=60)
        p2p, node = loop.run(client_peer(peers["first"]), timeout_s=60)
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


def _batch(vocab: int, seed: int = 11) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, vocab, (2, 7), generator=generator)
    targets = torch.ones_like(input_ids, dtype=torch.bool)
    targets[1, 5:] = False  # a padded row
    targets[:, :2] = False  # context
    return input_ids, targets


def grads_of(
    params: AdapterParams,
    ends: ModelEnds,
    blocks,
    batch: tuple[torch.Tensor, torch.Tensor],
) -> dict[str, torch.Tensor]:
    """The gradients of every trainable tensor on one batch."""
    params.zero_grad()
    loss, _ = causal_loss(ends, params.prompt, params.span_adapter(), blocks, *batch)
    loss.backward()
    return {name: p.grad.clone() for name, p in params.named_parameters()}


def _grads(params: AdapterParams, swarm: Swarm, blocks) -> dict[str, torch.Tensor]:
    return grads_of(params, swarm.ends, blocks, _batch(swarm.ends.config.vocab_size))


def moved_params(settings: MethodSettings, config: ModelConfig) -> AdapterParams:
    """A method's parameters, moved off their zero start so every gradient path is live."""
    params = AdapterParams(settings, config, embed_std=1.0, seed=5)
    with torch.no_grad():
        for p in params.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(9)) * 0.05)
    return params


@pytest.mark.parametrize("settings", METHODS.values(), ids=METHODS.keys())
def test_swarm_gradients_equal_local_ones(swarm: Swarm, settings: MethodSettings) -> None:
    params = moved_params(settings, swarm.ends.config)
    local = _grads(params, swarm, LocalBlocks(swarm.full))
    remote = _grads(params, swarm, SwarmBlocks(swarm.client, swarm.loop.loop))
    assert set(local) == set(remote) and local
    for name, expected in local.items():
        assert expected.abs().sum() > 0, f"{name} has no gradient: the test would be void"
        torch.testing.assert_close(remote[name], expected, atol=TOLERANCE, rtol=TOLERANCE)


def test_a_server_over_its_adapter_cap_refuses_with_a_clear_error(swarm: Swarm) -> None:
    handler = swarm.peers["first"].handler
    caps = handler.caps
    handler.caps = dataclasses.replace(caps, max_adapter_bytes=4096)
    try:
        params = moved_params(METHODS["lora"], swarm.ends.config)
        with pytest.raises(
            BadRequestError,
            match=r"an adapter of [\d.]+ KiB for blocks \[0, 2\) exceeds "
            r"this server's cap of 4 KiB",
        ):
            _grads(params, swarm, SwarmBlocks(swarm.client, swarm.loop.loop))
    finally:
        handler.caps = caps


def _train(swarm: Swarm, *, kill_at: int | None) -> list[float]:
    """Five LoRA steps through the swarm; at step `kill_at`, the server that ran the
    forward of blocks 2:4 is killed before the backward."""
    params = moved_params(METHODS["lora"], swarm.ends.config)
    optimizer = torch.optim.AdamW(params.parameters(), lr=1e-2)
    blocks = SwarmBlocks(swarm.client, swarm.loop.loop)
    replicas = [swarm.peers["second"], swarm.peers["spare"]]
    losses = []
    for step in range(5):
        served = [p.handler.stats.requests for p in replicas]
        input_ids, targets = _batch(swarm.ends.config.vocab_size, seed=step)
        loss, _ = causal_loss(
            swarm.ends, params.prompt, params.span_adapter(), blocks, input_ids, targets
        )
        if step == kill_at:
            (victim,) = [
                p for p, n in zip(replicas, served, strict=True) if p.handler.stats.requests > n
            ]
            swarm.loop.run(stop_peers([victim]), timeout_s=30)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_training_goes_on_when_a_server_dies_mid_step_and_its_losses_are_unchanged(
    swarm: Swarm,
) -> None:
    """Runs last in this module: it kills one of the two servers of blocks 2:4."""
    uninterrupted = _train(swarm, kill_at=None)
    interrupted = _train(swarm, kill_at=2)
    assert not all(p.p2p.is_alive for p in swarm.peers.values())
    torch.testing.assert_close(interrupted, uninterrupted, atol=TOLERANCE, rtol=TOLERANCE)
