"""Block servers on real hivemind P2P daemons (loopback) against the same blocks run locally."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Iterator

import pytest
import torch
from hivemind.p2p import P2P
from volunteer.models.model import BlockSpan, CausalLM, ModelEnds

from tests.server import WAIT_S, LoopThread, hidden_states, random_span, sub_span, tiny_config
from volunteer.client.remote_span import RemoteSpan
from volunteer.server.compute import (
    PRIORITY_INFERENCE,
    PRIORITY_TRAINING,
    PriorityCompute,
)
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import PROTOCOL_VERSION

# hivemind's P2P.create finds its daemon binary with importlib.resources.path().
pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

ATOL = 1e-5
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


@dataclasses.dataclass
class Swarm:
    loop: LoopThread
    full: BlockSpan
    """The reference: every block, run locally."""
    servers: list[P2P]
    handlers: list[BlockHandler]
    clients: list[P2P]

    def remote(self, server: int, start: int, end: int, client: int = 0) -> RemoteSpan:
        peer_id = self.servers[server].peer_id
        return RemoteSpan(p2p=self.clients[client], peer_id=peer_id, start=start, end=end)

    def local(self, start: int, end: int) -> BlockSpan:
        return sub_span(self.full, start, end)


async def _start(full: BlockSpan) -> tuple[list[P2P], list[BlockHandler], list[P2P]]:
    servers = [await P2P.create(host_maddrs=LOOPBACK) for _ in range(2)]
    handlers = [
        await BlockHandler.create(
            p2p=p2p,
            span=sub_span(full, start, end),
            model_name="tiny",
            cache_tokens=256,
            max_batch=4,
            max_chunk=16,
            throughput=12.5,
        )
        for p2p, (start, end) in zip(servers, [(0, 2), (2, 4)], strict=True)
    ]
    maddrs = [addr for p2p in servers for addr in await p2p.get_visible_maddrs()]
    clients = [await P2P.create(host_maddrs=LOOPBACK, initial_peers=maddrs) for _ in range(2)]
    return servers, handlers, clients


async def _stop(swarm: Swarm) -> None:
    for handler in swarm.handlers:
        await handler.shutdown()
    for p2p in swarm.clients + swarm.servers:
        await p2p.shutdown()


@pytest.fixture(scope="module")
def swarm() -> Iterator[Swarm]:
    loop = LoopThread()
    full = random_span(tiny_config())
    try:
        servers, handlers, clients = loop.run(_start(full))
        swarm = Swarm(loop=loop, full=full, servers=servers, handlers=handlers, clients=clients)
        yield swarm
        loop.run(_stop(swarm))
    finally:
        loop.close()


def _close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    return (actual - expected).abs().max().item() <= ATOL


def test_info_describes_the_server(swarm: Swarm) -> None:
    info = swarm.loop.run(swarm.remote(1, 2, 4).info(timeout_s=10))
    assert (info.start, info.end, info.model_name) == (2, 4, "tiny")
    assert (info.hidden_size, info.dtype, info.version) == (64, "float32", PROTOCOL_VERSION)
    assert info.cache_tokens_total == info.cache_tokens_left == 256
    assert (info.max_batch, info.max_chunk, info.max_length) == (4, 16, 128)
    assert info.throughput == 12.5


def test_forward_equals_the_local_span(swarm: Swarm) -> None:
    hidden = hidden_states(2, 7)
    actual = swarm.loop.run(swarm.remote(0, 0, 2).forward(hidden, timeout_s=10))
    with torch.no_grad():
        expected = swarm.local(0, 2)(hidden)
    assert _close(actual, expected)


def test_forward_through_a_sub_span(swarm: Swarm) -> None:
    hidden = hidden_states(1, 5)
    actual = swarm.loop.run(swarm.remote(1, 3, 4).forward(hidden, timeout_s=10))
    with torch.no_grad():
        expected = swarm.local(3, 4)(hidden)
        other_block = swarm.local(2, 3)(hidden)
    assert _close(actual, expected)
    assert not _close(actual, other_block)


def test_backward_equals_local_autograd(swarm: Swarm) -> None:
    hidden, grad_outputs = hidden_states(2, 6, seed=3), hidden_states(2, 6, seed=4)
    remote = swarm.remote(0, 0, 2)
    actual, adapter_grads = swarm.loop.run(remote.backward(hidden, grad_outputs, timeout_s=10))
    assert adapter_grads == ()
    inputs = hidden.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(swarm.local(0, 2)(inputs), inputs, grad_outputs)
    assert _close(actual, expected)
    assert expected.abs().sum() > 0


async def _decode(remote: RemoteSpan, hidden: torch.Tensor, cuts: list[int]) -> torch.Tensor:
    """Runs hidden [B, S, H] through an inference session in chunks ending at `cuts`."""
    stream = await remote.open_inference(max_length=32, batch_size=hidden.shape[0], timeout_s=10)
    outputs, start = [], 0
    for end in cuts:
        outputs.append(await stream.step(hidden[:, start:end], start, timeout_s=10))
        start = end
    await stream.close()
    return torch.cat(outputs, dim=1)


def test_inference_equals_local_cache_and_full_forward(swarm: Swarm) -> None:
    hidden, cuts = hidden_states(2, 9), [4, 5, 6, 9]
    actual = swarm.loop.run(_decode(swarm.remote(0, 0, 2), hidden, cuts))
    local = swarm.local(0, 2)
    cache = local.allocate_cache(batch_size=2, max_length=32)
    steps, start = [], 0
    with torch.no_grad():
        for end in cuts:
            steps.append(local(hidden[:, start:end], start_pos=start, cache=cache))
            start = end
        full = local(hidden)
    assert _close(actual, torch.cat(steps, dim=1))
    assert _close(actual, full)


def test_two_servers_chained_equal_the_whole_model(swarm: Swarm) -> None:
    config = swarm.full.config
    torch.manual_seed(5)
    ends = ModelEnds(config).eval()
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(6))

    async def remote_logits() -> torch.Tensor:
        hidden = ends.embed(ids).detach()
        hidden = await swarm.remote(0, 0, 2).forward(hidden, timeout_s=10)
        hidden = await swarm.remote(1, 2, 4).forward(hidden, timeout_s=10)
        return ends.logits(hidden)

    with torch.no_grad():
        actual = swarm.loop.run(remote_logits())
        expected = CausalLM(ends, swarm.local(0, 4))(ids)
    assert (actual - expected).abs().max().item() <= 1e-4


def test_concurrent_sessions_match_running_alone(swarm: Swarm) -> None:
    inputs = [hidden_states(1, 6, seed=7), hidden_states(3, 6, seed=8)]
    cuts = [2, 3, 4, 5, 6]

    async def together() -> list[torch.Tensor]:
        return list(
            await asyncio.gather(
                *(
                    _decode(swarm.remote(0, 0, 2, client=client), hidden, cuts)
                    for client, hidden in enumerate(inputs)
                )
            )
        )

    alone = [swarm.loop.run(_decode(swarm.remote(0, 0, 2), hidden, cuts)) for hidden in inputs]
    both = swarm.loop.run(together())
    for each_alone, each_together in zip(alone, both, strict=True):
        assert _close(each_together, each_alone)


def test_replay_from_an_earlier_position_gives_identical_outputs(swarm: Swarm) -> None:
    hidden = hidden_states(2, 8, seed=9)
    changed = hidden_states(2, 3, seed=10)

    async def session() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        stream = await swarm.remote(0, 0, 2).open_inference(max_length=16, batch_size=2)
        await stream.step(hidden[:, :3], 0)
        first = await stream.step(hidden[:, 3:6], 3)
        replayed = await stream.step(hidden[:, 3:6], 3)  # rewind, same inputs
        rewritten = await stream.step(changed, 3)  # rewind, new inputs
        after = await stream.step(hidden[:, 6:8], 6)
        await stream.close()
        return first, replayed, rewritten, after

    first, replayed, rewritten, after = swarm.loop.run(session())
    # The same step at the same position: bit for bit the same answer.
    assert torch.equal(replayed, first)
    with torch.no_grad():
        expected = swarm.local(0, 2)(torch.cat([hidden[:, :3], changed, hidden[:, 6:8]], dim=1))
    assert _close(rewritten, expected[:, 3:6])
    assert _close(after, expected[:, 6:8])


def test_sessions_return_their_budget(swarm: Swarm) -> None:
    remote = swarm.remote(0, 0, 2)

    async def open_then_close() -> tuple[int, int]:
        stream = await remote.open_inference(max_length=20, batch_size=3)
        during = (await remote.info()).cache_tokens_left
        await stream.step(hidden_states(3, 2, seed=11), 0)
        await stream.close()
        # The server frees the cache when it sees the close, which the client does not
        # wait for: ask until it has (the deadline only stops a hang).
        deadline = time.monotonic() + WAIT_S
        while (after := (await remote.info()).cache_tokens_left) != 256:
            if time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.02)
        return during, after

    assert swarm.loop.run(open_then_close()) == (256 - 60, 256)
    # ... and an idle server no longer waits for its steps to come back (`_gather`).
    assert not set().union(*swarm.handlers[0].batcher.recent)


def test_inference_jumps_the_queue_of_training_work() -> None:
    order: list[str] = []
    gate = asyncio.Event()

    async def scenario() -> None:
        compute = PriorityCompute()
        loop = asyncio.get_running_loop()

        def blocker() -> None:
            # Holds the compute thread until every other job is queued.
            while not gate.is_set():
                time.sleep(0.001)

        jobs = [asyncio.ensure_future(compute.run(PRIORITY_TRAINING, blocker, peer="a"))]
        await asyncio.sleep(0.05)
        jobs += [
            asyncio.ensure_future(
                compute.run(PRIORITY_TRAINING, order.append, "training", peer="a")
            )
            for _ in range(3)
        ]
        stepping = compute.run(PRIORITY_INFERENCE, order.append, "step", peer="a")
        jobs.append(asyncio.ensure_future(stepping))
        await asyncio.sleep(0.05)
        loop.call_soon(gate.set)
        await asyncio.wait_for(asyncio.gather(*jobs), 10)
        compute.shutdown()

    asyncio.run(scenario())
    assert order == ["step", "training", "training", "training"]
