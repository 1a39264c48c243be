"""What a DHT node keeps for others, bounded: subkeys per key and records in total.

hivemind's `DHTLocalStorage` keeps whatever passes the validator, without limit. Each
record of ours is one signed subkey per peer (`volunteer.swarm.dht_validator`), so a
stranger with many keys could still grow a key's dictionary, or the node's memory,
without end. `BoundedDHTStorage` refuses a *new* subkey once its key holds
`MAX_SUBKEYS_PER_KEY`, and a new record once the node holds `MAX_STORED_RECORDS`;
refreshing a subkey already held always succeeds. Refusing rather than evicting keeps
the peers already announced: evicting the earliest-expiring entries would drop honest
records in favour of any flood that sets a later expiration.

Memory bound: `MAX_STORED_RECORDS` records of at most `MAX_RECORD_BYTES` +
`MAX_SUBKEY_BYTES` each, in the storage and again in the cache (about 250 MiB each,
worst case, before Python's overhead).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from hivemind.dht.node import DHTNode
from hivemind.dht.routing import DHTID
from hivemind.dht.storage import DHTLocalStorage, DictionaryDHTValue

MAX_SUBKEYS_PER_KEY = 512
"""Servers announced under one block key; a real block has far fewer replicas."""
MAX_STORED_RECORDS = 50_000
"""Records (subkeys, over all keys) one node keeps for others, in storage and in cache."""
RECOUNT_EVERY_S = 1.0
"""While full, how often the records are counted again (to see expired ones go): a
flood of refused stores must not cost a count of every record each."""


class BoundedDHTStorage(DHTLocalStorage):
    """A `DHTLocalStorage` with the caps above (smaller ones in tests)."""

    def __init__(
        self,
        *,
        max_subkeys_per_key: int = MAX_SUBKEYS_PER_KEY,
        max_records: int = MAX_STORED_RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.max_subkeys_per_key = max_subkeys_per_key
        self.max_records = max_records
        self.recounts = 0
        """How many times the records were counted (the costly part of refusing)."""
        self._clock = clock
        self._count_hint = 0
        """Records held, counted up on each new one; expiry only lowers the truth, so
        the exact (costly) count is taken only when the hint reaches the cap."""
        self._next_recount = -float("inf")

    def store_subkey(self, key: DHTID, subkey: Any, value: bytes, expiration_time: float) -> bool:
        current = self.get(key)
        held = current is not None and isinstance(current.value, DictionaryDHTValue)
        if held and subkey in current.value:
            return super().store_subkey(key, subkey, value, expiration_time)
        if held and len(current.value) >= self.max_subkeys_per_key:
            return False
        if not self._has_room():
            return False
        stored = super().store_subkey(key, subkey, value, expiration_time)
        self._count_hint += stored
        return stored

    def _has_room(self) -> bool:
        if self._count_hint < self.max_records:
            return True
        now = self._clock()
        if now < self._next_recount:
            return False
        self._next_recount = now + RECOUNT_EVERY_S
        self.recounts += 1
        self._count_hint = sum(
            len(item.value) if isinstance(item.value, DictionaryDHTValue) else 1
            for _, item in self.items()
        )
        return self._count_hint < self.max_records


def bound_node_storage(node: DHTNode, **caps: Any) -> None:
    """Replaces a freshly created node's storage and cache with bounded ones.

    hivemind's `DHTNode.create` builds them unbounded and takes no storage class, so
    this swaps them right after creation, before the node has stored anything of note.
    """
    node.protocol.storage = BoundedDHTStorage(**caps)
    node.protocol.cache = BoundedDHTStorage(**caps)
