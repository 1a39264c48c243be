"""Credit summaries in a real DHT: each server publishes under its own signed subkey of
its shard, any peer reads them all, nobody writes another's, and summaries that are
malformed or under another shard are dropped."""

from __future__ import annotations

import asyncio
import time

from hivemind.utils import get_dht_time
from hivemind.utils.crypto import RSAPrivateKey

from tests.swarm.dht_helpers import two_nodes
from volunteer.swarm.dht_records import owner_marker, peer_id_from_owner
from volunteer.trust.credit_summary import (
    SHARDS,
    Summary,
    credit_key,
    publish_on_node,
    read_on_node,
    shard_key,
)

TIMEOUT_S = 20.0


def _summary(**changes: object) -> Summary:
    fields: dict[str, object] = dict(
        model="m", as_of_s=time.time(), receipts=1, root=b"r" * 32, sums=(5, 4, 1)
    )
    return Summary.model_validate({**fields, **changes})


def test_summaries_are_published_per_server_and_read_from_every_shard() -> None:
    key_a, key_b = RSAPrivateKey(), RSAPrivateKey()

    async def scenario() -> None:
        async with two_nodes(key_a, key_b) as (node_a, node_b):
            owner_a, owner_b = owner_marker(key_a), owner_marker(key_b)
            a, b = peer_id_from_owner(owner_a), peer_id_from_owner(owner_b)
            assert await publish_on_node(node_a, _summary(), owner=owner_a, timeout_s=TIMEOUT_S)
            # Nobody writes under another's subkey (the DHT checks the owner's signature).
            forged = _summary(sums=(10**9, 0, 0))
            assert not await publish_on_node(node_b, forged, owner=owner_a, timeout_s=TIMEOUT_S)
            # Under one's own subkey, but in a shard not its own, or junk: read past.
            mine = _summary(public_name="bob", sums=(9, 9, 0))
            other = next(s for s in range(SHARDS) if shard_key("m", s) != credit_key("m", b))
            expires = get_dht_time() + 60
            await node_b.store(shard_key("m", other), mine.model_dump(), expires, subkey=owner_b)
            await node_b.store(credit_key("m", b), {"sums": "junk"}, expires, subkey=owner_b)
            read = await read_on_node(node_a, "m", timeout_s=TIMEOUT_S)
            assert read is not None and set(read) == {a} and read[a].sums == (5, 4, 1)
            # Its own summary, in its own shard, replaces the junk (a later expiration).
            assert await publish_on_node(node_b, mine, owner=owner_b, timeout_s=TIMEOUT_S)
            read = await read_on_node(node_a, "m", timeout_s=TIMEOUT_S)
            assert read is not None and read[b] == mine and set(read) == {a, b}
            assert await read_on_node(node_a, "nothing-here", timeout_s=TIMEOUT_S) == {}

    asyncio.run(scenario())


def test_a_peer_always_publishes_under_the_same_one_of_the_shards() -> None:
    peers = [peer_id_from_owner(owner_marker(RSAPrivateKey())) for _ in range(40)]
    keys = {credit_key("m", peer) for peer in peers}
    assert all(credit_key("m", peer) == credit_key("m", peer) for peer in peers)
    assert len(keys) > 10 and keys <= {shard_key("m", s) for s in range(SHARDS)}
