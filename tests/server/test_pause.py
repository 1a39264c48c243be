"""A paused server turns new work away as busy and lets open sessions finish."""

from __future__ import annotations

import pytest
import torch
from hivemind.p2p import P2P

from tests.server import LoopThread, hidden_states, random_span, sub_span, tiny_config
from volunteer.client.remote_span import RemoteSpan
from volunteer.server.handler import BlockHandler
from volunteer.transport.protocol import BusyError

pytestmark = pytest.mark.filterwarnings("ignore:path is deprecated:DeprecationWarning")

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]


async def _scenario(full: torch.nn.Module) -> dict[str, object]:
    server = await P2P.create(host_maddrs=LOOPBACK)
    handler = await BlockHandler.create(
        p2p=server, span=sub_span(full, 0, 2), model_name="tiny", cache_tokens=256
    )
    client = await P2P.create(host_maddrs=LOOPBACK, initial_peers=await server.get_visible_maddrs())
    hidden = hidden_states(1, 6)
    refused: list[str] = []
    try:
        remote = RemoteSpan(p2p=client, peer_id=server.peer_id, start=0, end=2)
        stream = await remote.open_inference(max_length=16, batch_size=1, timeout_s=10)
        first = await stream.step(hidden[:, :4], 0, timeout_s=10)
        handler.is_paused = True
        for attempt in (
            remote.open_inference(max_length=16, batch_size=1, timeout_s=10),
            remote.forward(hidden, timeout_s=10),
            remote.backward(hidden, hidden, timeout_s=10),
        ):
            try:
                await attempt
            except BusyError as exc:
                refused.append(str(exc))
        second = await stream.step(hidden[:, 4:], 4, timeout_s=10)  # the open one goes on
        await stream.close()
        handler.is_paused = False
        after = await remote.forward(hidden, timeout_s=10)
        return {"session": torch.cat([first, second], dim=1), "refused": refused, "after": after}
    finally:
        await handler.shutdown()
        await client.shutdown()
        await server.shutdown()


def test_a_paused_server_refuses_new_work_and_finishes_open_sessions() -> None:
    full = random_span(tiny_config())
    loop = LoopThread()
    try:
        result = loop.run(_scenario(full))
    finally:
        loop.close()
    hidden = hidden_states(1, 6)
    with torch.no_grad():
        expected = sub_span(full, 0, 2)(hidden)
    assert torch.allclose(result["session"], expected, atol=1e-5)  # type: ignore[arg-type]
    refused = result["refused"]
    assert len(refused) == 3 and all("paused by its volunteer" in r for r in refused)  # type: ignore[union-attr]
    assert torch.allclose(result["after"], expected, atol=1e-5)  # type: ignore[arg-type]
