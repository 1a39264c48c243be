"""The DHT budgets on a real node: one peer's flood of stores, look-ups or pings is
refused past its budget, unread, while another peer is still served."""

from __future__ import annotations

import asyncio

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.proto import dht_pb2
from hivemind.utils import get_dht_time

from volunteer.swarm.dht_guard import MAX_KEYS_PER_REQUEST, DHTBudgets, guard_dht
from volunteer.transport.peer_budget import PeerBudget

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
BURST = 20


def _budget() -> PeerBudget:
    # Refilled slowly enough that the test's own pace does not matter.
    return PeerBudget(rate=0.01, burst=BURST)


async def _store(sender: DHTNode, target: DHTNode, count: int, tag: str) -> list[bool]:
    keys = [DHTID.generate(source=f"{tag}{i}") for i in range(count)]
    expiration = get_dht_time() + 60
    stored = await sender.protocol.call_store(target.peer_id, keys, [b"v"] * count, expiration)
    assert stored is not None, "the guarded node did not answer"
    return stored


async def _find(sender: DHTNode, target: DHTNode, keys: list[DHTID]) -> list[bool]:
    """For each key, whether the target said it holds a value."""
    found = await sender.protocol.call_find(target.peer_id, keys)
    assert found is not None, "the guarded node did not answer"
    return [found[key][0] is not None for key in keys]


async def _nodes() -> tuple[DHTNode, DHTNode, DHTNode]:
    guarded = await DHTNode.create(host_maddrs=LOOPBACK)
    maddrs = [str(addr) for addr in await guarded.get_visible_maddrs()]
    attacker = await DHTNode.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    honest = await DHTNode.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    return guarded, attacker, honest


async def _stores() -> None:
    guarded, attacker, honest = await _nodes()
    try:
        budgets = await guard_dht(guarded, DHTBudgets(store=_budget()))
        assert all(await _store(attacker, guarded, BURST, "a"))
        flood = [await _store(attacker, guarded, 5, f"f{i}-") for i in range(20)]
        assert not any(any(batch) for batch in flood)
        assert budgets.store.refused == 20
        held = sum(1 for _ in guarded.protocol.storage.items())
        assert held == BURST  # the refused records were never stored
        assert all(await _store(honest, guarded, 5, "h"))
        # A single request larger than any honest batch is refused whole.
        assert not any(await _store(honest, guarded, MAX_KEYS_PER_REQUEST + 1, "big"))
    finally:
        for node in (honest, attacker, guarded):
            await node.shutdown()


async def _finds_and_pings() -> None:
    guarded, attacker, honest = await _nodes()
    try:
        budgets = await guard_dht(guarded, DHTBudgets(find=_budget(), ping=_budget()))
        keys = [DHTID.generate(source=f"k{i}") for i in range(4)]
        for key in keys:
            guarded.protocol.storage.store(key, b"held", get_dht_time() + 60)
        looked_up = [await _find(attacker, guarded, keys) for _ in range(10)]
        # 20 keys' worth of budget: five look-ups of four keys find them, then nothing.
        assert [all(each) for each in looked_up] == [True] * 5 + [False] * 5
        assert not any(any(each) for each in looked_up[5:])
        assert all(await _find(honest, guarded, keys))
        request = dht_pb2.PingRequest(peer=attacker.protocol.node_info, validate=False)
        stub = attacker.protocol.get_stub(guarded.peer_id)
        answers = [await stub.rpc_ping(request, timeout=30) for _ in range(BURST + 5)]
        assert [bool(a.peer.node_id) for a in answers] == [True] * (BURST + 5)
        assert budgets.ping.refused == 5
    finally:
        for node in (honest, attacker, guarded):
            await node.shutdown()


def test_a_peers_flood_of_stores_is_refused_past_its_budget() -> None:
    asyncio.run(asyncio.wait_for(_stores(), 120))


def test_a_peers_flood_of_look_ups_and_pings_is_refused_past_its_budget() -> None:
    asyncio.run(asyncio.wait_for(_finds_and_pings(), 120))
