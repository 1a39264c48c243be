"""The store budget on a real DHT node: one peer's flood of stores is refused past its
budget, unread, while another peer's stores are still taken."""

from __future__ import annotations

import asyncio

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.utils import get_dht_time

from volunteer.swarm.dht_guard import MAX_RECORDS_PER_STORE, guard_stores
from volunteer.transport.peer_budget import PeerBudget

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
BURST = 20


async def _store(sender: DHTNode, target: DHTNode, count: int, tag: str) -> list[bool]:
    keys = [DHTID.generate(source=f"{tag}{i}") for i in range(count)]
    expiration = get_dht_time() + 60
    stored = await sender.protocol.call_store(target.peer_id, keys, [b"v"] * count, expiration)
    assert stored is not None, "the guarded node did not answer"
    return stored


async def _scenario() -> None:
    guarded = await DHTNode.create(host_maddrs=LOOPBACK)
    maddrs = [str(addr) for addr in await guarded.get_visible_maddrs()]
    attacker = await DHTNode.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    honest = await DHTNode.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    try:
        # Refilled slowly enough that the test's own pace does not matter.
        budget = await guard_stores(guarded, PeerBudget(rate=0.01, burst=BURST))
        assert all(await _store(attacker, guarded, BURST, "a"))
        flood = [await _store(attacker, guarded, 5, f"f{i}-") for i in range(20)]
        assert not any(any(batch) for batch in flood), (flood, budget.refused, len(budget))
        assert budget.refused == 20
        held = sum(1 for _ in guarded.protocol.storage.items())
        assert held == BURST  # the refused records were never stored
        assert all(await _store(honest, guarded, 5, "h"))
        # A single request larger than any honest batch is refused whole.
        assert not any(await _store(honest, guarded, MAX_RECORDS_PER_STORE + 1, "big"))
    finally:
        for node in (honest, attacker, guarded):
            await node.shutdown()


def test_a_peers_flood_of_stores_is_refused_past_its_budget() -> None:
    asyncio.run(asyncio.wait_for(_scenario(), 120))
