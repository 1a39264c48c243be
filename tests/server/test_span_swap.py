"""A server that moves to other blocks: open sessions finish on the old ones."""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import P2P

from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from volunteer.client.remote_span import RemoteSpan
from volunteer.server.compute import PriorityCompute
from volunteer.server.handler import BlockHandler
from volunteer.server.sessions import SessionTable
from volunteer.server.validation import ServerLimits
from volunteer.transport.protocol import BadRequestError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
ATOL = 1e-5


async def _moving_server_scenario(full: torch.nn.Module) -> dict[str, torch.Tensor | str]:
    server = await P2P.create(host_maddrs=LOOPBACK)
    handler = await BlockHandler.create(
        p2p=server, span=sub_span(full, 0, 2), model_name="tiny", cache_tokens=256
    )
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=await server.get_visible_maddrs())
    hidden = hidden_states(1, 6)
    try:
        old = RemoteSpan(p2p=client, peer_id=server.peer_id, start=0, end=2)
        stream = await old.open_inference(max_length=16, batch_size=1, timeout_s=10)
        first = await stream.step(hidden[:, :4], 0, timeout_s=10)
        handler.swap_span(sub_span(full, 2, 4))
        # The session opened before the move goes on with the blocks it began on.
        second = await stream.step(hidden[:, 4:], 4, timeout_s=10)
        await stream.close()
        refused = ""
        try:
            await old.forward(hidden, timeout_s=10)
        except BadRequestError as exc:
            refused = str(exc)
        new = RemoteSpan(p2p=client, peer_id=server.peer_id, start=2, end=4)
        moved = await new.forward(hidden, timeout_s=10)
        info = await new.info(timeout_s=10)
        return {
            "session": torch.cat([first, second], dim=1),
            "refused": refused,
            "moved": moved,
            "info_span": torch.tensor([info.start, info.end]),
            "sessions_left": torch.tensor(len(handler.sessions)),
        }
    finally:
        await handler.shutdown()
        await client.shutdown()
        await server.shutdown()


def test_a_moved_server_finishes_open_sessions_and_serves_its_new_blocks() -> None:
    full = random_span(tiny_config())
    loop = LoopThread()
    try:
        result = loop.run(_moving_server_scenario(full))
    finally:
        loop.close()
    hidden = hidden_states(1, 6)
    with torch.no_grad():
        expected_old = sub_span(full, 0, 2)(hidden)
        expected_new = sub_span(full, 2, 4)(hidden)
    assert torch.allclose(result["session"], expected_old, atol=ATOL)
    assert torch.allclose(result["moved"], expected_new, atol=ATOL)
    assert "not inside the served span [2, 4)" in result["refused"]
    assert result["info_span"].tolist() == [2, 4]
    assert int(result["sessions_left"]) == 0


def test_only_a_span_of_the_same_model_and_length_can_be_swapped_in() -> None:
    full = random_span(tiny_config())
    limits = ServerLimits(max_batch=1, max_chunk=8, max_tokens=8, max_length=128, idle_timeout_s=5)
    handler = BlockHandler(
        span=sub_span(full, 0, 2),
        model_name="tiny",
        limits=limits,
        sessions=SessionTable(cache_tokens=64),
        compute=PriorityCompute(),
        throughput=0.0,
    )
    try:
        with pytest.raises(ValueError, match="as long"):
            handler.swap_span(sub_span(full, 1, 4))
        other_model = random_span(tiny_config(num_layers=2))
        with pytest.raises(ValueError, match="same model"):
            handler.swap_span(other_model)
        assert handler.span.start == 0
    finally:
        handler.compute.shutdown()
