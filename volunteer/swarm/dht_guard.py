"""Rate budgets on what strangers ask of our DHT node: stores, look-ups and pings.

hivemind's `DHTProtocol` answers every request however fast requests come, on the event
loop that here is also the block server's: a store checks each record's signature and
starts a ping task; a look-up serialises each key's whole dictionary (up to the subkey
cap) and walks the routing table; a ping that asks to be validated makes us dial the
sender back. The guard re-registers these handles so that each request first spends
from the sending peer's `PeerBudget` (one token per key or record, one per ping); a
request over budget, or over `MAX_KEYS_PER_REQUEST`, gets a well-formed empty answer
("not stored", "not found", "not available") without being read further.

That answer is held back for `HOLD_S`, past the sender's wait: answering at once would
only invite the next request, while a peer that gets no answer in time counts us as gone
(hivemind's node drops us from its routing table and blacklists us for a while, longer at
each timeout), so a flood from plain hivemind slows itself down. Only `MAX_HELD` answers
wait at once; past that a refusal goes out at once, so holding costs bounded memory.

An honest server stores one record per block it serves per announce period, and an
honest client reads the model's block keys once per snapshot: far below these rates.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.dht.protocol import DHTProtocol
from hivemind.p2p import P2PContext
from hivemind.proto import dht_pb2
from hivemind.utils import get_dht_time

from volunteer.transport.peer_budget import PeerBudget

logger = logging.getLogger(__name__)

STORE_RATE, STORE_BURST = 16.0, 256.0
"""Records one peer may store here: per second on average, and at once (a node joining
stores what it holds)."""
FIND_RATE, FIND_BURST = 64.0, 512.0
"""Keys one peer may look up here: per second on average, and at once."""
PING_RATE, PING_BURST = 4.0, 32.0
"""Pings one peer may send here: per second on average, and at once."""
MAX_KEYS_PER_REQUEST = 256
"""Keys or records in one request; hivemind batches far fewer."""
HOLD_S = 5.0
"""How long a refusal waits before it goes out: longer than hivemind's default wait for a
DHT answer (3 s)."""
MAX_HELD = 256
"""Refusals waiting at once, over all peers and handles (each a small answer and a task)."""


@dataclasses.dataclass(frozen=True)
class DHTBudgets:
    """One budget per kind of request, each per peer."""

    store: PeerBudget = dataclasses.field(
        default_factory=lambda: PeerBudget(rate=STORE_RATE, burst=STORE_BURST)
    )
    find: PeerBudget = dataclasses.field(
        default_factory=lambda: PeerBudget(rate=FIND_RATE, burst=FIND_BURST)
    )
    ping: PeerBudget = dataclasses.field(
        default_factory=lambda: PeerBudget(rate=PING_RATE, burst=PING_BURST)
    )


Handler = Callable[[Any, P2PContext], Awaitable[Any]]


class _Holds:
    """How many refusals are being held back now (one event loop: no lock needed)."""

    def __init__(self, hold_s: float, max_held: int) -> None:
        self.hold_s = hold_s
        self.max_held = max_held
        self.now = 0

    async def hold(self) -> None:
        if self.hold_s <= 0 or self.now >= self.max_held:
            return
        self.now += 1
        try:
            await asyncio.sleep(self.hold_s)
        finally:
            self.now -= 1


async def guard_dht(
    node: DHTNode,
    budgets: DHTBudgets | None = None,
    *,
    hold_s: float = HOLD_S,
    max_held: int = MAX_HELD,
) -> DHTBudgets:
    """Puts per-peer budgets in front of `node`'s store, find and ping handles.

    `hold_s` and `max_held` are `HOLD_S` and `MAX_HELD` (see the module's docstring).

    Raises:
        hivemind's P2P errors if a handle cannot be registered again.
    """
    protocol = node.protocol
    if budgets is None:
        budgets = DHTBudgets()

    def not_stored(request: dht_pb2.StoreRequest) -> dht_pb2.StoreResponse:
        return dht_pb2.StoreResponse(store_ok=[False] * len(request.keys), peer=protocol.node_info)

    def not_found(request: dht_pb2.FindRequest) -> dht_pb2.FindResponse:
        results = [dht_pb2.FindResult(type=dht_pb2.NOT_FOUND) for _ in request.keys]
        return dht_pb2.FindResponse(results=results, peer=protocol.node_info)

    def not_available(_: dht_pb2.PingRequest) -> dht_pb2.PingResponse:
        return dht_pb2.PingResponse(
            peer=protocol.node_info, dht_time=get_dht_time(), available=False
        )

    guards = [
        ("rpc_store", dht_pb2.StoreRequest, budgets.store, protocol.rpc_store, not_stored),
        ("rpc_find", dht_pb2.FindRequest, budgets.find, protocol.rpc_find, not_found),
        ("rpc_ping", dht_pb2.PingRequest, budgets.ping, protocol.rpc_ping, not_available),
    ]
    holds = _Holds(hold_s, max_held)
    for method, request_type, budget, serve, refuse in guards:
        # hivemind names a servicer's handles "<class>.<method>" (no namespace for the DHT).
        handle = f"{DHTProtocol.__name__}.{method}"
        guarded = _guarded(method, budget, serve, refuse, holds)
        await protocol.p2p.remove_protobuf_handler(handle)
        await protocol.p2p.add_protobuf_handler(handle, guarded, request_type)
    return budgets


def _guarded(
    method: str,
    budget: PeerBudget,
    serve: Handler,
    refuse: Callable[[Any], Any],
    holds: _Holds,
) -> Handler:
    async def handle(request: Any, context: P2PContext) -> Any:
        cost = len(getattr(request, "keys", ())) or 1
        if cost > MAX_KEYS_PER_REQUEST or not budget.take(context.remote_id, cost):
            if budget.refused % 1000 == 1:  # a flood is logged, not each request of it
                logger.info("refusing DHT %s from %s: over its rate", method, context.remote_id)
            answer = refuse(request)  # built now: the request itself is not kept while held
            del request
            await holds.hold()
            return answer
        return await serve(request, context)

    return handle
