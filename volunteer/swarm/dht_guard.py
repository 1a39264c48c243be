"""A rate budget on what strangers store in our DHT node.

hivemind's `DHTProtocol.rpc_store` checks every record it is sent (a signature check each)
and starts a ping task per request that names a peer, however fast the requests come: a
flood of stores costs the node's event loop, which here is also the block server's. The
guard re-registers the store handle so that each request first spends its number of
records from the sending peer's `PeerBudget`; a request over budget, or carrying more
than `MAX_RECORDS_PER_STORE` records, is answered "not stored" for every record unread.

An honest server stores one record per block it serves per announce period, spread over
the nodes nearest each key: far below the rate here.
"""

from __future__ import annotations

import logging

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.p2p import P2PContext
from hivemind.proto import dht_pb2

from volunteer.transport.peer_budget import PeerBudget

logger = logging.getLogger(__name__)

STORE_RATE = 16.0
"""Records per second one peer may store here, on average."""
STORE_BURST = 256.0
"""Records one peer may store at once (a node joining stores what it holds)."""
MAX_RECORDS_PER_STORE = 256
"""Records in one store request; hivemind batches far fewer."""
_STORE_HANDLE = "rpc_store"


async def guard_stores(node: DHTNode, budget: PeerBudget | None = None) -> PeerBudget:
    """Puts a per-peer budget in front of `node`'s store handle; returns the budget.

    Raises:
        hivemind's P2P errors if the handle cannot be registered again.
    """
    protocol = node.protocol
    if budget is None:  # not `or`: an empty budget is falsy (it has a length)
        budget = PeerBudget(rate=STORE_RATE, burst=STORE_BURST)
    # hivemind names a servicer's handles "<class>.<method>" (no namespace for the DHT).
    handle = f"{DHTProtocol.__name__}.{_STORE_HANDLE}"

    async def store(request: dht_pb2.StoreRequest, context: P2PContext) -> dht_pb2.StoreResponse:
        records = len(request.keys)
        if records > MAX_RECORDS_PER_STORE or not budget.take(context.remote_id, records):
            if budget.refused % 1000 == 1:  # a flood is logged, not each request of it
                logger.info("refusing DHT stores from %s: over its rate", context.remote_id)
            return dht_pb2.StoreResponse(store_ok=[False] * records, peer=protocol.node_info)
        return await protocol.rpc_store(request, context)

    await protocol.p2p.remove_protobuf_handler(handle)
    await protocol.p2p.add_protobuf_handler(handle, store, dht_pb2.StoreRequest)
    return budget
