"""The DHT budgets on a real node: one peer's flood of stores, look-ups or pings is
refused past its budget, unread, while another peer is still served; the refusal is held
back until plain hivemind has given up on us and stopped asking."""

from __future__ import annotations

import asyncio
import time

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.proto import dht_pb2
from hivemind.utils import get_dht_time

from volunteer.swarm.dht_guard import MAX_KEYS_PER_REQUEST, DHTBudgets, guard_dht
from volunteer.transport.peer_budget import PeerBudget

LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
BURST = 20
WAIT_S = 1.0
"""How long the attacking node waits for an answer (hivemind's default is 3 s)."""
HOLD_S = 4.0


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


async def _nodes(wait_timeout: float = 3.0) -> tuple[DHTNode, DHTNode, DHTNode]:
    guarded = await DHTNode.create(host_maddrs=LOOPBACK)
    maddrs = [str(addr) for addr in await guarded.get_visible_maddrs()]
    attacker = await DHTNode.create(
        host_maddrs=LOOPBACK, initial_peers=maddrs, wait_timeout=wait_timeout
    )
    honest = await DHTNode.create(host_maddrs=LOOPBACK, initial_peers=maddrs)
    return guarded, attacker, honest


async def _stores() -> None:
    guarded, attacker, honest = await _nodes()
    try:
        budgets = await guard_dht(guarded, DHTBudgets(store=_budget()), hold_s=0)
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
        budgets = await guard_dht(guarded, DHTBudgets(find=_budget(), ping=_budget()), hold_s=0)
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


async def _held_refusals() -> None:
    guarded, attacker, honest = await _nodes(wait_timeout=WAIT_S)
    try:
        budgets = await guard_dht(guarded, DHTBudgets(store=_budget()), hold_s=HOLD_S, max_held=3)
        assert all(await _store(attacker, guarded, BURST, "a"))
        assert guarded.node_id in attacker.protocol.routing_table
        began = time.monotonic()
        keys = [DHTID.generate(source=f"f{i}") for i in range(5)]
        flood = [
            attacker.protocol.call_store(guarded.peer_id, [key], [b"v"], get_dht_time() + 60)
            for key in keys
        ]
        # Three refusals are held past the attacker's wait: it hears nothing in time and
        # drops us from its routing table; the two past `max_held` are answered at once.
        answers = await asyncio.gather(*flood)
        assert sorted(map(str, answers)) == sorted(["None"] * 3 + ["[False]"] * 2)
        assert time.monotonic() - began < HOLD_S  # the attacker gave up; we are still holding
        assert budgets.store.refused == 5
        await asyncio.sleep(0.5)  # hivemind updates its table in a task of its own
        assert guarded.node_id not in attacker.protocol.routing_table
        # Meanwhile another peer is served at once.
        began = time.monotonic()
        assert all(await _store(honest, guarded, 5, "h"))
        assert time.monotonic() - began < WAIT_S
        assert sum(1 for _ in guarded.protocol.storage.items()) == BURST + 5
    finally:
        for node in (honest, attacker, guarded):
            await node.shutdown()


def test_a_peers_flood_of_stores_is_refused_past_its_budget() -> None:
    asyncio.run(asyncio.wait_for(_stores(), 120))


def test_a_peers_flood_of_look_ups_and_pings_is_refused_past_its_budget() -> None:
    asyncio.run(asyncio.wait_for(_finds_and_pings(), 120))


def test_a_refusal_is_held_until_the_flooding_peer_gives_up_on_us() -> None:
    asyncio.run(asyncio.wait_for(_held_refusals(), 120))
