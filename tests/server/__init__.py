"""Helpers for the block-server tests: a tiny random model, an event loop in a thread,
and waits on conditions.

The servers of a test module live on one loop that runs in a background thread, so plain
sync tests can share them (pytest-asyncio is not used) and call `loop.run(coro)`.

Tests wait for what they expect to happen (`wait_until`), never for a fixed time: a
loaded machine only makes them slower. The deadline only stops a hang.
"""

from __future__ import annotations

import os
import tempfile
import time
import warnings
from collections.abc import Callable
from typing import Any

import torch

with warnings.catch_warnings():
    # hivemind's package import runs torch.jit.script, which torch now deprecates; the
    # suite turns warnings into errors, so the one import that triggers it is done here.
    warnings.simplefilter("ignore", DeprecationWarning)
    import hivemind  # noqa: F401

from hivemind.p2p import P2P
from volunteer.models.config import ModelConfig
from volunteer.models.model import BlockSpan

from volunteer.client.loop_thread import LoopThread
from volunteer.client.remote_span import InferenceStream
from volunteer.server.handler import BlockHandler
from volunteer.swarm.dht_records import encode_p2p_identity
from volunteer.transport.commitment import PeerSigner

__all__ = [
    "WAIT_S",
    "LoopThread",
    "hidden_states",
    "random_span",
    "signing_p2p",
    "start_route_servers",
    "step_until_pushed",
    "sub_span",
    "tiny_config",
    "wait_until",
]


HIDDEN = 64
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
WAIT_S = 30.0
"""The longest a test waits for something it expects: far beyond what it takes, so that
only a hang (the behaviour broke) runs into it."""


def tiny_config(num_layers: int = 4) -> ModelConfig:
    """A small llama-shaped config (GQA: 4 heads over 2 KV heads)."""
    return ModelConfig(
        arch="llama",
        vocab_size=97,
        hidden_size=HIDDEN,
        intermediate_size=160,
        num_layers=num_layers,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        rms_norm_eps=1e-5,
        max_position_embeddings=128,
    )


def random_span(config: ModelConfig, seed: int = 0) -> BlockSpan:
    """Every block of `config` with random weights, norms included (so none can hide)."""
    torch.manual_seed(seed)
    span = BlockSpan(config, 0, config.num_layers)
    with torch.no_grad():
        for name, param in span.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.2)
    return span.eval()


def sub_span(full: BlockSpan, start: int, end: int) -> BlockSpan:
    """Blocks [start, end) of `full`, as a span of their own with copied weights."""
    part = BlockSpan(full.config, start, end)
    for index in range(start, end):
        part.blocks[index - start].load_state_dict(full.blocks[index].state_dict())
    part.forget_weights()
    return part.eval()


def whole_forward(full: BlockSpan, hidden: torch.Tensor, start: int, end: int) -> torch.Tensor:
    """The reference a served forward must match: blocks [start, end) of `full` (a span
    from block 0) run at once through the model's own span, no cache."""
    with torch.no_grad():
        return sub_span(full, start, end)(hidden)


def whole_backward(
    full: BlockSpan, hidden: torch.Tensor, grad_outputs: torch.Tensor, start: int, end: int
) -> torch.Tensor:
    """The reference a served backward must match: the gradient of blocks [start, end)'s
    inputs, by autograd through them all at once."""
    inputs = hidden.detach().requires_grad_(True)
    with torch.enable_grad():
        outputs = sub_span(full, start, end)(inputs)
        (grad,) = torch.autograd.grad(outputs, inputs, grad_outputs)
    return grad


async def signing_p2p(**options: Any) -> tuple[P2P, PeerSigner]:
    """A P2P whose peer id is a fresh RSA key, as a daemon's is, and that key's signer:
    a server given it (`BlockHandler.signer`) commits to its steps."""
    from hivemind.utils.crypto import RSAPrivateKey

    key = RSAPrivateKey()
    descriptor, path = tempfile.mkstemp(prefix="identity-")
    try:
        os.write(descriptor, encode_p2p_identity(key))
        os.close(descriptor)
        p2p = await P2P.create(identity_path=path, **options)
    finally:
        os.unlink(path)
    return p2p, PeerSigner(key)


def hidden_states(batch: int, seq: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, seq, HIDDEN, generator=torch.Generator().manual_seed(seed))


async def start_route_servers(
    full: BlockSpan, spans: list[tuple[int, int]]
) -> tuple[list[tuple[P2P, BlockHandler]], P2P]:
    """A block server for each span of `full` on 127.0.0.1, each joined through the ones
    before it as servers of one swarm know each other, and a client P2P that knows them
    all."""
    servers: list[tuple[P2P, BlockHandler]] = []
    for start, end in spans:
        known = [addr for p2p, _ in servers for addr in await p2p.get_visible_maddrs()]
        p2p = await P2P.create(host_maddrs=LOOPBACK, initial_peers=known)
        handler = await BlockHandler.create(
            p2p=p2p,
            span=sub_span(full, start, end),
            model_name="tiny",
            cache_tokens=64,
            max_batch=1,
            max_chunk=8,
        )
        servers.append((p2p, handler))
    known = [addr for p2p, _ in servers for addr in await p2p.get_visible_maddrs()]
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=known)
    return servers, client


def wait_until(condition: Callable[[], bool], timeout_s: float = WAIT_S) -> bool:
    """Polls `condition` until it holds (True) or timeout_s has passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
    return True


def step_until_pushed(
    loop: LoopThread, first: InferenceStream, second: InferenceStream, hidden: torch.Tensor
) -> int:
    """Steps `hidden` at position 0 (rewinding each time) through `first`, naming `second`
    as the next hop, until `first`'s server pushes its output (its link to the next
    server opens in the background); returns the id of that pushed step.

    A step that was not pushed is sent on to `second` by the client, as a session does.
    """
    deadline = time.monotonic() + WAIT_S
    step_id = 0
    while time.monotonic() < deadline:
        step_id += 1
        stepping = first.step(hidden, 0, WAIT_S, step_id=step_id, push_to=[second.push_target])
        output = loop.run(stepping)
        if first.pushed:
            return step_id
        loop.run(second.step(output, 0, WAIT_S, step_id=step_id))
        time.sleep(0.01)
    raise AssertionError("the first server never pushed to the second")
